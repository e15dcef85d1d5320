package main

import (
	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/proxy"
)

// chaosServer installs the chaos tests' fault layers into a server's
// configuration and returns what stops them. This build has none: a keel
// built with -tags chaos replaces it (chaos.go), and only that binary
// links anything of chaos/.
var chaosServer = func(id string, cfg *replica.NodeConfig, log hclog.Logger) (stop func(), err error) {
	return func() {}, nil
}

// chaosProxy is chaosServer for a proxy named by its writer name.
var chaosProxy = func(writer string, cfg *proxy.Config, log hclog.Logger) (stop func(), err error) {
	return func() {}, nil
}
