package hostswitch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// API paths.
const (
	exposePath   = "/services/forwarder/expose"
	unexposePath = "/services/forwarder/unexpose"
	allPath      = "/services/forwarder/all"
)

// maxBody bounds what is read of an answer.
const maxBody = 16 << 20

// Forward is one entry of the forwarder API.
type Forward struct {
	Local    string `json:"local"`
	Remote   string `json:"remote,omitempty"`
	Protocol string `json:"protocol"`
}

type dialFunc = func(ctx context.Context, network, addr string) (net.Conn, error)

// withTimeout bounds each dial of dial by d.
func withTimeout(dial dialFunc, d time.Duration) dialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		return dial(ctx, network, addr)
	}
}

// client makes the forwarder API's requests and says what its answers
// mean, as the marks of core's errors: a connection that fails is
// core.PeerDown, a 4xx answer core.Permanent, "already running" a
// core.HeldElsewhere or core.Conflict after a look at the list. It keeps
// a few connections open between requests.
type client struct {
	base string // without a trailing slash
	http *http.Client
	log  *zap.Logger
}

func newClient(base string, dial dialFunc, log *zap.Logger) *client {
	tr := &http.Transport{
		Proxy:               nil, // the gateway is never reached through a proxy
		DialContext:         withTimeout(dial, 5*time.Second),
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
	}
	return &client{base: base, http: &http.Client{Transport: tr}, log: log}
}

// closeIdle closes the connections kept open; the next request makes a
// new one.
func (c *client) closeIdle() { c.http.CloseIdleConnections() }

// expose asks for f. An address someone holds already is looked up in
// the list: forwarded to the same remote it is held elsewhere, to another
// a conflict.
func (c *client) expose(ctx context.Context, f Forward) error {
	status, body, err := c.post(ctx, exposePath, f)
	if err != nil {
		return err
	}
	switch {
	case status == http.StatusOK:
		return nil
	case strings.Contains(body, "already running"):
		// Someone holds the address already; the list says with which
		// remote. Whether it is this agent's is the router's to know.
		all, err := c.forwards(ctx)
		if err != nil {
			return err
		}
		for _, e := range all {
			if e.Local == f.Local && e.Protocol == f.Protocol {
				if e.Remote == f.Remote {
					return core.HeldElsewhere(fmt.Errorf("expose %s/%s: already forwarded to %s", f.Local, f.Protocol, e.Remote))
				}
				return core.Conflict(fmt.Errorf("expose %s/%s: already forwarded to %s, not %s", f.Local, f.Protocol, e.Remote, f.Remote))
			}
		}
		return fmt.Errorf("expose %s/%s: %q but not listed; will retry", f.Local, f.Protocol, body)
	default:
		return apiError("expose", f, status, body)
	}
}

// unexpose asks for f's local address to be let go; one the API does not
// know is gone already.
func (c *client) unexpose(ctx context.Context, f Forward) error {
	status, body, err := c.post(ctx, unexposePath, Forward{Local: f.Local, Protocol: f.Protocol})
	if err != nil {
		return err
	}
	if status == http.StatusOK || strings.Contains(body, "not found") {
		return nil
	}
	return apiError("unexpose", f, status, body)
}

// apiError is an answer other than success: permanent when it is a 4xx
// (the request itself is wrong), retried otherwise (gvproxy answers 500
// while a host process holds the port, say).
func apiError(op string, f Forward, status int, body string) error {
	err := fmt.Errorf("%s %s/%s: HTTP %d: %s", op, f.Local, f.Protocol, status, body)
	if status >= 400 && status < 500 {
		return core.Permanent(err)
	}
	return err
}

// post sends f to path and returns the answer's status and (start of
// its) body.
func (c *client) post(ctx context.Context, path string, f Forward) (int, string, error) {
	payload, err := json.Marshal(f)
	if err != nil {
		return 0, "", core.Permanent(err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+path, bytes.NewReader(payload))
	if err != nil {
		return 0, "", core.Permanent(err)
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := c.http.Do(req)
	if err != nil {
		return 0, "", transportError(ctx, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 4096))
	if err != nil {
		return 0, "", fmt.Errorf("%s: reading answer: %w", path, err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, maxBody))
	c.log.Debug("forwarder API", zap.String("path", path), zap.Any("request", f), zap.Int("status", res.StatusCode), zap.ByteString("answer", bytes.TrimSpace(body)))
	return res.StatusCode, strings.TrimSpace(string(body)), nil
}

// transportError marks a request that got no answer as the peer being
// down, unless the request's own context ended it.
func transportError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return err
	}
	return core.PeerDown(err)
}

// forwards returns the forwards the API lists.
func (c *client) forwards(ctx context.Context) ([]Forward, error) {
	all, _, err := c.list(ctx)
	return all, err
}

// list returns the forwards the API lists, and the answer's body.
func (c *client) list(ctx context.Context) ([]Forward, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+allPath, nil)
	if err != nil {
		return nil, nil, err
	}
	res, err := c.http.Do(req)
	if err != nil {
		return nil, nil, transportError(ctx, err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
		return nil, nil, fmt.Errorf("list forwards: HTTP %d: %s", res.StatusCode, bytes.TrimSpace(body))
	}
	body, err := io.ReadAll(io.LimitReader(res.Body, maxBody))
	if err != nil {
		return nil, nil, transportError(ctx, err)
	}
	// Read what may follow so the connection is reused rather than
	// closed.
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, maxBody))
	all, err := DecodeForwards(bytes.NewReader(body))
	return all, body, err
}

// DecodeForwards reads the API's answer to a list request: a JSON list of
// forwards, at most maxBody bytes of it.
func DecodeForwards(r io.Reader) ([]Forward, error) {
	var all []Forward
	if err := json.NewDecoder(io.LimitReader(r, maxBody)).Decode(&all); err != nil {
		return nil, fmt.Errorf("list forwards: answer is not a JSON list of forwards: %w", err)
	}
	return all, nil
}
