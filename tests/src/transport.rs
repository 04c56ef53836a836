//! The three ways a client talks to a node: WebSocket with JSON text frames, WebSocket with
//! binary frames, and QUIC (binary frames; the client trusts the node's cluster CA). A test
//! written once over a [`Transport`] runs over each of [`Transport::ALL`].

use std::fmt;

use client_proto::client::{ClientError, ClientOptions, ConnectOptions, Connection};
use client_proto::codec::Codec;
use client_proto::http::LoginResponse;

use crate::{TestNode, TestUser};

/// How a client connects to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// WebSocket, JSON in text frames.
    WsJson,
    /// WebSocket, the binary codec in binary frames.
    WsBinary,
    /// QUIC: one stream of length-prefixed frames in the binary codec.
    Quic,
}

impl Transport {
    /// Every transport, in the order tests are named.
    pub const ALL: [Transport; 3] = [Transport::WsJson, Transport::WsBinary, Transport::Quic];

    /// The name in test names: `ws_json`, `ws_binary`, `quic`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::WsJson => "ws_json",
            Transport::WsBinary => "ws_binary",
            Transport::Quic => "quic",
        }
    }

    /// Whether this is QUIC (not WebSocket).
    pub fn is_quic(self) -> bool {
        self == Transport::Quic
    }

    /// The frame encoding.
    pub fn codec(self) -> Codec {
        match self {
            Transport::WsJson => Codec::Json,
            Transport::WsBinary | Transport::Quic => Codec::Binary,
        }
    }

    /// Where a client connects: the node's WebSocket URL or its `quic://` address.
    pub fn url(self, node: &TestNode) -> String {
        match self {
            Transport::WsJson | Transport::WsBinary => node.ws_url(),
            Transport::Quic => node.quic.clone(),
        }
    }

    /// How a client connects: the codec, and for QUIC the node's cluster CA.
    pub fn options(self, node: &TestNode) -> ConnectOptions {
        ConnectOptions {
            codec: self.codec(),
            ca_pem: self.is_quic().then(|| node.ca_pem()),
        }
    }

    /// The options of a [`client_proto::client::ChatClient`] that connects with `token`.
    pub fn client_options(self, node: &TestNode, token: &str) -> ClientOptions {
        let mut options = ClientOptions::new(self.url(node), token);
        options.connect = self.options(node);
        options
    }

    /// Connects, authenticates with `token` and waits for `ready`, or for the refusal.
    pub async fn try_connect(
        self,
        node: &TestNode,
        token: &str,
    ) -> Result<Connection, ClientError> {
        Connection::connect_with(&self.url(node), token, &self.options(node)).await
    }

    /// Connects the device of an existing login.
    pub async fn connect(self, node: &TestNode, login: &LoginResponse) -> Connection {
        self.try_connect(node, &login.token).await.unwrap()
    }

    /// Logs in another device of `user` and connects it.
    pub async fn device(self, node: &TestNode, user: &TestUser) -> (LoginResponse, Connection) {
        let login = node
            .api()
            .login(&user.name, &user.password, None)
            .await
            .unwrap();
        let conn = self.connect(node, &login).await;
        (login, conn)
    }

    /// Opens the transport without authenticating (for tests of the handshake itself).
    pub async fn connect_unauthenticated(self, node: &TestNode) -> Connection {
        Connection::connect_unauthenticated(&self.url(node), &self.options(node))
            .await
            .unwrap()
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
