//! `Debug` for the types that carry secrets or message bodies: tokens and passwords are
//! never printed and bodies show their length only, so no log level (not even
//! `--log trace`) and no `{:?}` in an error can leak them.

use std::fmt;

use crate::frames::{ClientFrame, Message};
use crate::http::{LoginRequest, LoginResponse, SignupRequest};

/// What a redacted text shows: its length.
struct Len(usize);

impl fmt::Debug for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

struct Hidden;

impl fmt::Debug for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for ClientFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientFrame::Auth { .. } => f.debug_struct("Auth").field("token", &Hidden).finish(),
            ClientFrame::Send { id, to, body } => f
                .debug_struct("Send")
                .field("id", id)
                .field("to", to)
                .field("body", &Len(body.len()))
                .finish(),
            // The other frames carry neither secrets nor bodies: their JSON form.
            other => match serde_json::to_string(other) {
                Ok(json) => write!(f, "{json}"),
                Err(_) => f.write_str(other.kind()),
            },
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("message_id", &self.message_id)
            .field("conversation", &self.conversation)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("group", &self.group)
            .field("body", &Len(self.body.len()))
            .field("ts", &self.ts)
            .field("client_id", &self.client_id)
            .finish()
    }
}

impl fmt::Debug for SignupRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignupRequest")
            .field("username", &self.username)
            .field("password", &Hidden)
            .field("display_name", &self.display_name)
            .finish()
    }
}

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field("username", &self.username)
            .field("password", &Hidden)
            .field("device_id", &self.device_id)
            .field("device_name", &self.device_name)
            .finish()
    }
}

impl fmt::Debug for LoginResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginResponse")
            .field("token", &Hidden)
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("expires_at", &self.expires_at)
            .field("node", &self.node)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::frames::{Recipient, ServerFrame};
    use crate::ids::{ConversationId, DeviceId, MessageId, UserId};

    const SECRET: &str = "s3cret-token-or-body";

    #[test]
    fn debug_output_never_holds_tokens_passwords_or_bodies() {
        let message = Message {
            message_id: MessageId(1),
            conversation: ConversationId::direct(UserId(3), UserId(4)),
            from: UserId(3),
            to: Some(UserId(4)),
            group: None,
            body: SECRET.into(),
            ts: 5,
            client_id: "c1".into(),
        };
        let shown = [
            format!(
                "{:?}",
                ClientFrame::Auth {
                    token: SECRET.into()
                }
            ),
            format!(
                "{:?}",
                ClientFrame::Send {
                    id: "c1".into(),
                    to: Recipient::User(UserId(4)),
                    body: SECRET.into(),
                }
            ),
            format!("{message:?}"),
            format!(
                "{:#?}",
                ServerFrame::Message {
                    message: std::sync::Arc::new(message)
                }
            ),
            format!(
                "{:?}",
                LoginRequest {
                    username: "alice".into(),
                    password: SECRET.into(),
                    device_id: Some(DeviceId(1)),
                    device_name: None,
                }
            ),
            format!(
                "{:?}",
                SignupRequest {
                    username: "alice".into(),
                    password: SECRET.into(),
                    display_name: None,
                }
            ),
            format!(
                "{:?}",
                LoginResponse {
                    token: SECRET.into(),
                    user_id: UserId(3),
                    device_id: DeviceId(1),
                    expires_at: 9,
                    node: crate::http::NodeInfo {
                        node_id: 0,
                        ws_url: "ws://x".into(),
                        quic_addr: "x:1".into(),
                    },
                }
            ),
        ];
        for s in &shown {
            assert!(!s.contains(SECRET), "{s}");
            assert!(!s.contains("s3cret"), "{s}");
        }
        assert!(shown[1].contains("<20 bytes>"), "{}", shown[1]);
        assert!(shown[4].contains("alice"), "{}", shown[4]);
        let sync = format!(
            "{:?}",
            ClientFrame::Sync {
                after: None,
                limit: Some(5)
            }
        );
        assert!(sync.contains("sync") && sync.contains('5'), "{sync}");
    }
}
