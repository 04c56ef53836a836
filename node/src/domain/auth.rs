//! Credentials: HMAC-signed, expiring tokens (password hashes are `passwords.rs`).
//!
//! A token is `base64url(claims) "." base64url(HMAC-SHA256(secret, claims))`. Any node with
//! the cluster secret checks the signature and expiry without a lookup; revocation (logout)
//! is checked against the user record's device list (see `accounts`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use client_proto::ids::{DeviceId, UserId};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HMAC-SHA256(`key`, `label`) in lowercase hex: a key for one purpose derived from the
/// cluster secret (the admin token, the webhook signing key), so that one leaked derived key
/// reveals neither the secret nor the others.
pub fn derive_hex(key: &[u8], label: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(label);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A checked token: who is calling, from which device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub device: DeviceId,
}

/// What a token says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct Claims {
    pub user: UserId,
    pub device: DeviceId,
    /// Must equal the device record's `token_id` (logout removes the device).
    pub token_id: u64,
    /// Unix ms after which the token is refused.
    pub expires_at: u64,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is wrong")]
    BadSignature,
    #[error("the token expired")]
    Expired,
}

/// Issues and checks tokens with the cluster secret.
pub struct Tokens {
    mac: Hmac<Sha256>,
}

/// Longest token we bother to parse.
const MAX_TOKEN_LEN: usize = 512;

impl Tokens {
    pub fn new(secret: &[u8]) -> Self {
        Tokens {
            mac: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length"),
        }
    }

    pub fn issue(&self, claims: &Claims) -> String {
        let payload =
            bincode::encode_to_vec(claims, bincode::config::standard()).unwrap_or_default();
        let mut mac = self.mac.clone();
        mac.update(&payload);
        let sig = mac.finalize().into_bytes();
        format!("{}.{}", B64.encode(&payload), B64.encode(sig))
    }

    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac.clone();
        mac.update(&payload);
        mac.verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        let (claims, _): (Claims, _) =
            bincode::decode_from_slice(&payload, bincode::config::standard())
                .map_err(|_| TokenError::Malformed)?;
        if claims.expires_at <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_tampering() {
        let t = Tokens::new(b"secret");
        let c = Claims {
            user: UserId(1),
            device: DeviceId(2),
            token_id: 3,
            expires_at: 1_000,
        };
        let tok = t.issue(&c);
        assert_eq!(t.verify(&tok, 999), Ok(c));
        assert_eq!(t.verify(&tok, 1_000), Err(TokenError::Expired));
        assert_eq!(
            Tokens::new(b"other").verify(&tok, 0),
            Err(TokenError::BadSignature)
        );
        let mut forged = tok.clone();
        forged.replace_range(0..1, if &tok[0..1] == "A" { "B" } else { "A" });
        assert!(t.verify(&forged, 0).is_err());
        assert_eq!(t.verify("nodot", 0), Err(TokenError::Malformed));
        assert_eq!(t.verify(&"a".repeat(600), 0), Err(TokenError::Malformed));
    }
}
