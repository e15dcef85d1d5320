package nbd

import "testing"

// TestTLSDecide is the TLS policy as a table: mode, whether the session is
// secured, the option and its data length, and the verdict.
func TestTLSDecide(t *testing.T) {
	for _, tc := range []struct {
		mode    TLSMode
		secured bool
		opt     uint32
		dataLen uint32
		want    tlsVerdict
	}{
		{TLSOff, false, OptStartTLS, 0, tlsRefuseUnsup},
		{TLSOff, false, OptStartTLS, 3, tlsRefuseUnsup},
		{TLSOff, false, OptGo, 10, tlsProceed},
		{TLSOff, false, OptExportName, 0, tlsProceed},
		{TLSOn, false, OptStartTLS, 0, tlsStart},
		{TLSOn, false, OptStartTLS, 1, tlsRefuseInvalid},
		{TLSOn, true, OptStartTLS, 0, tlsRefuseInvalid},
		{TLSOn, false, OptGo, 10, tlsProceed},
		{TLSOn, false, OptExportName, 4, tlsProceed},
		{TLSRequire, false, OptStartTLS, 0, tlsStart},
		{TLSRequire, true, OptStartTLS, 0, tlsRefuseInvalid},
		{TLSRequire, false, OptAbort, 0, tlsProceed},
		{TLSRequire, false, OptExportName, 4, tlsHangUp},
		{TLSRequire, false, OptGo, 10, tlsRefuseReqd},
		{TLSRequire, false, OptInfo, 10, tlsRefuseReqd},
		{TLSRequire, false, OptList, 0, tlsRefuseReqd},
		{TLSRequire, false, OptStructuredReply, 0, tlsRefuseReqd},
		{TLSRequire, false, 4242, 0, tlsRefuseReqd},
		{TLSRequire, true, OptGo, 10, tlsProceed},
		{TLSRequire, true, OptExportName, 4, tlsProceed},
	} {
		if got := tlsDecide(tc.mode, tc.secured, tc.opt, tc.dataLen); got != tc.want {
			t.Errorf("tlsDecide(%v, secured %v, %s, %d) = %d, want %d", tc.mode, tc.secured, optName(tc.opt), tc.dataLen, got, tc.want)
		}
	}
}
