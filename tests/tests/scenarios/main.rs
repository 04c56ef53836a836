//! The client protocol, written once and run over every transport: WebSocket with JSON text
//! frames, WebSocket with binary frames, and QUIC ([`chat_tests::Transport`]). Each scenario is
//! an `async fn(Transport)` in the file of its idea; [`over_each_transport!`] turns it into
//! one `#[tokio::test]` per transport, named `<scenario>_over_<transport>`, so that
//! `cargo test -p chat-tests --test scenarios quic` (or `ws_json`, `ws_binary`) runs one
//! transport.
//!
//! What only one transport has is tested once, elsewhere: the HTTP API (`single_node.rs`,
//! `groups.rs`), trusting the cluster CA on QUIC (`quic.rs`), the terminal client
//! (`terminal_client.rs`).

#![allow(clippy::unwrap_used)]

use chat_tests::Transport;

/// Makes one `#[tokio::test]` per transport that runs `scenario` over it. Rust macros cannot
/// build identifiers, so the three test names are spelled out, in the order of
/// [`Transport::ALL`] (ws_json, ws_binary, quic); each test checks that its name is
/// `<scenario>_over_<transport>`.
macro_rules! over_each_transport {
    ($scenario:ident => $ws_json:ident, $ws_binary:ident, $quic:ident $(,)?) => {
        over_each_transport!(@one $scenario, $ws_json, WsJson);
        over_each_transport!(@one $scenario, $ws_binary, WsBinary);
        over_each_transport!(@one $scenario, $quic, Quic);
    };
    (@one $scenario:ident, $test:ident, $transport:ident) => {
        #[tokio::test]
        async fn $test() {
            let t = chat_tests::Transport::$transport;
            $crate::check_test_name(stringify!($test), stringify!($scenario), t);
            $scenario(t).await;
        }
    };
}

/// A generated test is named after its scenario and the transport it runs over.
fn check_test_name(test: &str, scenario: &str, t: Transport) {
    assert_eq!(test, format!("{scenario}_over_{t}"), "misnamed test");
}

mod support;

mod bad_input;
mod closing;
mod cursor;
mod delivery;
mod escaping;
mod groups;
mod history;
mod rate_limit;
mod restart;
mod sync;
