package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
)

// session is what the handshake agreed on; the transmission phase reads it.
type session struct {
	export     *Export
	flags      uint16 // transmission flags sent to the client
	structured bool   // structured replies (or extended headers) in use
	extended   bool   // extended headers in use
	// blockSizeAgreed: the client asked for NBD_INFO_BLOCK_SIZE in
	// NBD_OPT_GO, so it promised to honour the advertised constraints and
	// misaligned requests get EINVAL. Clients that did not ask get the
	// protocol's default minimum of 1.
	blockSizeAgreed bool
	// metaContextID is the id of base:allocation, 0 when not selected.
	metaContextID uint32
}

const (
	baseAllocationID = 1
	// maxOptions bounds how many options one client may send before we
	// treat it as a denial of service and hang up.
	maxOptions = 4096
)

// errAbort ends a connection cleanly during the handshake (NBD_OPT_ABORT).
var errAbort = errors.New("nbd: client aborted the handshake")

// optionReplier writes option replies; each reply is flushed so a client
// waiting for it is never stuck behind our buffer.
type optionReplier struct {
	w   *bufio.Writer
	buf []byte
}

func (r *optionReplier) reply(option, typ uint32, data []byte) error {
	r.buf = AppendOptionReply(r.buf[:0], option, typ, data)
	if _, err := r.w.Write(r.buf); err != nil {
		return err
	}
	return r.w.Flush()
}

func (r *optionReplier) fail(option, typ uint32, format string, args ...any) error {
	return r.reply(option, typ, []byte(fmt.Sprintf(format, args...)))
}

// handshake runs the fixed newstyle negotiation and returns the session the
// client chose, or an error that ends the connection. After STARTTLS hc
// holds the TLS connection, which the transmission phase then uses.
func (s *Server) handshake(ctx context.Context, hc *hsConn) (*session, error) {
	br, bw := hc.br, hc.bw
	if _, err := bw.Write(AppendServerGreeting(nil, FlagFixedNewstyle|FlagNoZeroes)); err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(br, cf[:]); err != nil {
		return nil, fmt.Errorf("reading client flags: %w", err)
	}
	clientFlags := be.Uint32(cf[:])
	if clientFlags&^(ClientFixedNewstyle|ClientNoZeroes) != 0 {
		return nil, protoErrorf("unknown client flags %#x (not an NBD client?)", clientFlags)
	}
	noZeroes := clientFlags&ClientNoZeroes != 0

	st := &session{}
	// The export the last SET_META_CONTEXT was for; a GO for another export
	// leaves no context selected.
	var metaExport *Export
	rep := &optionReplier{w: bw}
	var hdr [optionHeaderSize]byte
	for n := 0; ; n++ {
		if n >= maxOptions {
			return nil, protoErrorf("more than %d options", maxOptions)
		}
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return nil, fmt.Errorf("reading option: %w", err)
		}
		oh, err := ParseOptionHeader(hdr[:])
		if err != nil {
			return nil, protoErrorf("%v", err)
		}
		verdict := tlsDecide(s.cfg.TLS, hc.secured, oh.Option, oh.Length)
		if oh.Length > MaxOptionLength {
			if _, err := io.CopyN(io.Discard, br, int64(oh.Length)); err != nil {
				return nil, fmt.Errorf("skipping option data: %w", err)
			}
			typ := uint32(RepErrInvalid)
			switch {
			case verdict == tlsRefuseReqd:
				hc.refusedTLS++
				typ = RepErrTLSReqd
			case !knownOption(oh.Option):
				typ = RepErrUnsup
			}
			if err := rep.fail(oh.Option, typ, "option data of %d bytes is longer than the %d this server accepts", oh.Length, MaxOptionLength); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, oh.Length)
		if _, err := io.ReadFull(br, data); err != nil {
			return nil, fmt.Errorf("reading option data: %w", err)
		}

		switch verdict {
		case tlsProceed:
		case tlsRefuseUnsup:
			if err := rep.fail(oh.Option, RepErrUnsup, "this server runs without TLS"); err != nil {
				return nil, err
			}
			continue
		case tlsRefuseInvalid:
			msg := "TLS is already in use"
			if !hc.secured {
				msg = "NBD_OPT_STARTTLS takes no data"
			}
			if err := rep.fail(oh.Option, RepErrInvalid, "%s", msg); err != nil {
				return nil, err
			}
			continue
		case tlsRefuseReqd:
			hc.refusedTLS++
			if err := rep.fail(oh.Option, RepErrTLSReqd, "this server requires TLS: send NBD_OPT_STARTTLS first"); err != nil {
				return nil, err
			}
			continue
		case tlsHangUp:
			return nil, fmt.Errorf("%w: the client chose an export with NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS", ErrTLSRequired)
		case tlsStart:
			if err := rep.reply(oh.Option, RepAck, nil); err != nil {
				return nil, err
			}
			if err := s.startTLS(ctx, hc); err != nil {
				return nil, err
			}
			// The haggling starts over under TLS: nothing chosen in
			// plain text counts.
			br, bw = hc.br, hc.bw
			rep = &optionReplier{w: bw}
			st, metaExport = &session{}, nil
			continue
		}

		switch oh.Option {
		case OptExportName:
			if st.extended {
				return nil, protoErrorf("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
			}
			e := s.lookup(string(data))
			if e == nil {
				return nil, protoErrorf("NBD_OPT_EXPORT_NAME for unknown export %q", string(data))
			}
			st.export = e
			st.flags = s.transmissionFlags(e, st)
			if metaExport != e {
				st.metaContextID = 0
			}
			if _, err := bw.Write(AppendExportNameReply(nil, e.Backend.Size(), st.flags, noZeroes)); err != nil {
				return nil, err
			}
			return st, bw.Flush()

		case OptAbort:
			_ = rep.reply(oh.Option, RepAck, nil) // the client may already be gone
			return nil, errAbort

		case OptList:
			if len(data) != 0 {
				err = rep.fail(oh.Option, RepErrInvalid, "NBD_OPT_LIST takes no data")
				break
			}
			for _, e := range s.exports {
				if err = rep.reply(oh.Option, RepServer, AppendRepServer(nil, e.Name, e.Description)); err != nil {
					return nil, err
				}
			}
			err = rep.reply(oh.Option, RepAck, nil)

		case OptInfo, OptGo:
			req, perr := ParseExportRequest(data)
			if perr != nil {
				err = rep.fail(oh.Option, RepErrInvalid, "%v", perr)
				break
			}
			e := s.lookup(req.Name)
			if e == nil {
				err = rep.fail(oh.Option, RepErrUnknown, "unknown export %q", req.Name)
				break
			}
			flags := s.transmissionFlags(e, st)
			if err = s.replyInfo(rep, oh.Option, e, flags, req.Infos); err != nil {
				return nil, err
			}
			if err = rep.reply(oh.Option, RepAck, nil); err != nil {
				return nil, err
			}
			if oh.Option == OptGo {
				st.export = e
				st.flags = flags
				st.blockSizeAgreed = containsInfo(req.Infos, InfoBlockSize)
				if metaExport != e {
					st.metaContextID = 0
				}
				return st, nil
			}

		case OptStructuredReply:
			switch {
			case len(data) != 0:
				err = rep.fail(oh.Option, RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
			case st.extended:
				err = rep.fail(oh.Option, RepErrExtHeaderReqd, "extended headers are already in use")
			default:
				st.structured = true
				err = rep.reply(oh.Option, RepAck, nil)
			}

		case OptExtendedHeaders:
			if len(data) != 0 {
				err = rep.fail(oh.Option, RepErrInvalid, "NBD_OPT_EXTENDED_HEADERS takes no data")
				break
			}
			st.extended, st.structured = true, true
			err = rep.reply(oh.Option, RepAck, nil)

		case OptListMetaContext, OptSetMetaContext:
			set := oh.Option == OptSetMetaContext
			if set {
				// SET replaces the selection even when it fails.
				st.metaContextID, metaExport = 0, nil
			}
			if !st.structured {
				err = rep.fail(oh.Option, RepErrInvalid, "negotiate structured replies before metadata contexts")
				break
			}
			req, perr := ParseMetaContextRequest(data)
			if perr != nil {
				err = rep.fail(oh.Option, RepErrInvalid, "%v", perr)
				break
			}
			e := s.lookup(req.Export)
			if e == nil {
				err = rep.fail(oh.Option, RepErrUnknown, "unknown export %q", req.Export)
				break
			}
			// base:allocation exists only where the backend can map
			// its allocation; otherwise no context is listed or set.
			if e.Backend.Capabilities().Has(CapExtents) && matchBaseAllocation(req.Queries, set) {
				id := uint32(0)
				if set {
					id = baseAllocationID
					st.metaContextID, metaExport = baseAllocationID, e
				}
				if err = rep.reply(oh.Option, RepMetaContext, AppendRepMetaContext(nil, id, MetaContextBaseAllocation)); err != nil {
					return nil, err
				}
			}
			err = rep.reply(oh.Option, RepAck, nil)

		default:
			// Unknown options and the withdrawn PEEK_EXPORT: refused, and the next option is
			// parsed as usual.
			err = rep.fail(oh.Option, RepErrUnsup, "option %d is not supported by this server", oh.Option)
		}
		if err != nil {
			return nil, err
		}
	}
}

func knownOption(o uint32) bool {
	switch o {
	case OptExportName, OptAbort, OptList, OptInfo, OptGo, OptStructuredReply,
		OptListMetaContext, OptSetMetaContext, OptExtendedHeaders:
		return true
	}
	return false
}

func containsInfo(infos []uint16, want uint16) bool {
	for _, i := range infos {
		if i == want {
			return true
		}
	}
	return false
}

// matchBaseAllocation reports whether the queries select (SET) or list
// (LIST) base:allocation. LIST with no queries lists everything, and LIST
// accepts the namespace wildcard "base:". Queries for other namespaces are
// ignored, as the protocol requires.
func matchBaseAllocation(queries []string, set bool) bool {
	if !set && len(queries) == 0 {
		return true
	}
	for _, q := range queries {
		if q == MetaContextBaseAllocation || (!set && q == "base:") {
			return true
		}
	}
	return false
}

// replyInfo sends the NBD_REP_INFO replies of INFO/GO: the export always,
// block sizes always (so clients that did not ask still learn them), name
// and description when asked.
func (s *Server) replyInfo(rep *optionReplier, option uint32, e *Export, flags uint16, infos []uint16) error {
	if err := rep.reply(option, RepInfo, AppendInfoExport(nil, e.Backend.Size(), flags)); err != nil {
		return err
	}
	if err := rep.reply(option, RepInfo, AppendInfoBlockSize(nil, e.BlockSize)); err != nil {
		return err
	}
	if containsInfo(infos, InfoName) {
		if err := rep.reply(option, RepInfo, AppendInfoString(nil, InfoName, e.Name)); err != nil {
			return err
		}
	}
	if containsInfo(infos, InfoDescription) && e.Description != "" {
		if err := rep.reply(option, RepInfo, AppendInfoString(nil, InfoDescription, e.Description)); err != nil {
			return err
		}
	}
	return nil
}

// transmissionFlags are the flags for export e given what was negotiated:
// what its backend declares it can do, less what a read-only export refuses.
func (s *Server) transmissionFlags(e *Export, st *session) uint16 {
	return advertisedFlags(e.Backend.Capabilities(), e.ReadOnly, st.structured, e.Rotational)
}

// advertisedFlags is a pure decision: the transmission flags for a backend
// with caps. A read-only export advertises no trim or zero; fast zero only
// ever comes with zero.
func advertisedFlags(caps Caps, readOnly, structured, rotational bool) uint16 {
	f := TFlagHasFlags
	for _, m := range []struct {
		cap  Caps
		flag uint16
	}{
		{CapFlush, TFlagSendFlush},
		{CapFUA, TFlagSendFUA},
		{CapCache, TFlagSendCache},
		{CapMultiConn, TFlagCanMultiConn},
	} {
		if caps.Has(m.cap) {
			f |= m.flag
		}
	}
	if readOnly {
		f |= TFlagReadOnly
	} else {
		if caps.Has(CapTrim) {
			f |= TFlagSendTrim
		}
		if caps.Has(CapZero) {
			f |= TFlagSendWriteZeroes
			if caps.Has(CapFastZero) {
				f |= TFlagSendFastZero
			}
		}
	}
	if structured {
		f |= TFlagSendDF
	}
	if rotational {
		f |= TFlagRotational
	}
	return f
}
