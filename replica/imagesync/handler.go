package imagesync

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/hashicorp/go-hclog"
)

// readPiece is how much the handler reads (and hashes) at a time, so one
// request holds at most this much memory whatever its chunk or length.
const readPiece = 1 << 20

// handler serves one image to syncing peers.
type handler struct {
	img  SourceImage
	log  hclog.Logger
	bufs sync.Pool // of *[]byte, readPiece long
}

// Handler serves img to syncing peers: GET "hashes" and "range" (see the
// package comment for the wire format), relative to where it is mounted, for
// example http.StripPrefix("/v1/sync", imagesync.Handler(img, log)). Bad
// requests are answered 400 with a one-line reason and logged; the handler
// never reads outside the image.
func Handler(img SourceImage, log hclog.Logger) http.Handler {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	h := &handler{img: img, log: log}
	h.bufs.New = func() any { b := make([]byte, readPiece); return &b }
	return h
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		h.fail(w, r, http.StatusMethodNotAllowed, "method %s not allowed (use GET)", r.Method)
		return
	}
	switch strings.TrimPrefix(r.URL.Path, "/") {
	case "hashes":
		h.serveHashes(w, r)
	case "range":
		h.serveRange(w, r)
	default:
		h.fail(w, r, http.StatusNotFound, "no such sync endpoint %q (want hashes or range)", r.URL.Path)
	}
}

// fail answers with a one-line text message and logs it.
func (h *handler) fail(w http.ResponseWriter, r *http.Request, code int, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	level := hclog.Warn
	if code >= 500 {
		level = hclog.Error
	}
	h.log.Log(level, "sync request refused", "remote", r.RemoteAddr, "url", r.URL.String(), "status", code, "reason", msg)
	http.Error(w, "imagesync: "+msg, code)
}

// badRequest is a reason to answer 400.
type badRequest string

func (b badRequest) Error() string { return string(b) }

// number parses the query parameter name as an unsigned decimal.
func number(r *http.Request, name string) (uint64, error) {
	vals, ok := r.URL.Query()[name]
	if !ok || len(vals) == 0 {
		return 0, badRequest(fmt.Sprintf("missing %s", name))
	}
	if len(vals) > 1 {
		return 0, badRequest(fmt.Sprintf("%s given %d times", name, len(vals)))
	}
	v, err := strconv.ParseUint(vals[0], 10, 64)
	if err != nil {
		return 0, badRequest(fmt.Sprintf("%s %q is not an unsigned decimal number below 2^64", name, vals[0]))
	}
	return v, nil
}

// checkSpan validates [off, off+length) against the image size, the wire
// alignment and maxLen.
func checkSpan(off, length, size, maxLen uint64) error {
	switch {
	case off%Align != 0:
		return badRequest(fmt.Sprintf("offset %d is not a multiple of %d", off, Align))
	case length == 0:
		return badRequest("length is 0")
	case length > maxLen:
		return badRequest(fmt.Sprintf("length %d exceeds the limit of %d", length, maxLen))
	case off >= size || length > size-off:
		return badRequest(fmt.Sprintf("range %d+%d is outside the image (%d bytes)", off, length, size))
	case length%Align != 0 && off+length != size:
		return badRequest(fmt.Sprintf("length %d is not a multiple of %d and does not end at the image end (%d)", length, Align, size))
	}
	return nil
}

// parseHashes validates a hashes request.
func parseHashes(r *http.Request, size uint64) (off, length, chunk uint64, err error) {
	if off, err = number(r, "offset"); err != nil {
		return
	}
	if length, err = number(r, "length"); err != nil {
		return
	}
	if chunk, err = number(r, "chunk"); err != nil {
		return
	}
	switch {
	case chunk == 0 || chunk%Align != 0:
		err = badRequest(fmt.Sprintf("chunk %d is not a positive multiple of %d", chunk, Align))
	case chunk > MaxChunk:
		err = badRequest(fmt.Sprintf("chunk %d exceeds the limit of %d", chunk, MaxChunk))
	default:
		err = checkSpan(off, length, size, MaxHashSpan)
	}
	if err == nil && length%chunk != 0 && off+length != size {
		err = badRequest(fmt.Sprintf("length %d is not a multiple of chunk %d and does not end at the image end (%d)", length, chunk, size))
	}
	return
}

func (h *handler) serveHashes(w http.ResponseWriter, r *http.Request) {
	size := h.img.Size()
	off, length, chunk, err := parseHashes(r, size)
	if err != nil {
		h.fail(w, r, http.StatusBadRequest, "hashes: %v", err)
		return
	}
	bp := h.bufs.Get().(*[]byte)
	defer h.bufs.Put(bp)
	n := (length + chunk - 1) / chunk
	cs := newChunkSummer(h.img, *bp)
	sums, _, err := cs.sums(off, length, chunk, make([]sum, 0, n), nil)
	if err != nil {
		h.fail(w, r, http.StatusInternalServerError, "hashes of %d+%d: %v", off, length, err)
		return
	}
	body := appendRecords(make([]byte, 0, n*recordSize), sums)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set(SizeHeader, strconv.FormatUint(size, 10))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	if _, err := w.Write(body); err != nil {
		h.log.Debug("sync client went away", "remote", r.RemoteAddr, "error", err)
	}
}

func (h *handler) serveRange(w http.ResponseWriter, r *http.Request) {
	size := h.img.Size()
	off, err := number(r, "offset")
	var length uint64
	if err == nil {
		length, err = number(r, "length")
	}
	if err == nil {
		err = checkSpan(off, length, size, MaxRange)
	}
	if err != nil {
		h.fail(w, r, http.StatusBadRequest, "range: %v", err)
		return
	}
	bp := h.bufs.Get().(*[]byte)
	defer h.bufs.Put(bp)
	buf := *bp
	end := off + length
	// Read the first piece before answering, so a read error that shows up
	// at once is a clean 500 rather than a truncated body.
	first := buf[:min(length, uint64(len(buf)))]
	if err := h.img.ReadAt(first, off); err != nil {
		h.fail(w, r, http.StatusInternalServerError, "range %d+%d: %v", off, length, err)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatUint(length, 10))
	w.Header().Set(SizeHeader, strconv.FormatUint(size, 10))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	p := first
	for pos := off; ; {
		if _, err := w.Write(p); err != nil {
			h.log.Debug("sync client went away", "remote", r.RemoteAddr, "error", err)
			return
		}
		pos += uint64(len(p))
		if pos >= end {
			return
		}
		p = buf[:min(end-pos, uint64(len(buf)))]
		if err := h.img.ReadAt(p, pos); err != nil {
			// The status is gone; stopping short of Content-Length makes
			// the server drop the connection and the client see a short body.
			h.log.Error("sync range read failed mid-body", "remote", r.RemoteAddr, "offset", pos, "error", err)
			return
		}
	}
}
