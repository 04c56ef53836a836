//! Which webhook targets the node may POST to.
//!
//! A user chooses the URL, so without a check a user could make the node POST to its own
//! admin or peer ports, to anything else on its private network, or to a cloud metadata
//! service. Targets must therefore reach public addresses only: loopback, private,
//! link-local, shared (CGNAT), multicast, documentation and other special-purpose ranges
//! are refused, however the address is written (`0x7f000001`, `2130706433`, `[::1]`,
//! `[::ffff:127.0.0.1]` all parse to the address they mean). An operator allowlist
//! (`--push-allow-hosts`: host names and CIDRs) lifts the rule for what it names.
//!
//! The check runs twice: at registration ([`TargetPolicy::check_url`]: the URL's form,
//! and its address if it is an IP literal), and at send time, where every address a host
//! name resolves to is checked and the connection goes to exactly those addresses
//! ([`GuardedResolver`]), so a name that resolves to a public address at registration and
//! to a private one later (DNS rebinding) is still refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// Longest accepted webhook URL.
pub const MAX_TARGET_BYTES: usize = 2048;

/// Why a webhook target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not an `http://` or `https://` URL with a host, or too long.
    #[error("target must be an http:// or https:// URL with a host, of at most {MAX_TARGET_BYTES} bytes")]
    Malformed,
    /// The URL carries user info (`user:password@`), which would be sent and logged.
    #[error("target must not carry a user name or password; put a secret in the path instead")]
    Credentials,
    /// The target is (or resolves to) an address that is not public.
    #[error("target {host} is a loopback, private, link-local or otherwise internal address ({ip}); webhooks must reach public addresses (an operator can allow it with --push-allow-hosts)")]
    Internal {
        /// The host as written.
        host: String,
        /// The refused address.
        ip: IpAddr,
    },
    /// The host name did not resolve.
    #[error("target host {0} does not resolve")]
    Unresolved(String),
}

/// The webhook target rule: public addresses only, plus the operator's allowlist.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
}

impl TargetPolicy {
    /// Reads `--push-allow-hosts` entries: CIDRs (`10.0.0.0/8`), single addresses
    /// (`127.0.0.1`) or host names (`hooks.internal`, matched exactly, case-insensitively;
    /// an allowed name may resolve to any address).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut policy = TargetPolicy::default();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if let Ok(net) = entry.parse::<IpNet>() {
                policy.nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                policy.nets.push(IpNet::from(ip));
            } else if entry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                && entry.len() <= 253
            {
                policy.hosts.push(entry.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "--push-allow-hosts entry {entry:?} is neither a CIDR, an IP address nor a host name"
                ));
            }
        }
        Ok(policy)
    }

    /// Whether the allowlist names `host`.
    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Whether the node may connect to `ip`.
    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip)) || is_public(ip)
    }

    /// Checks a target's form and, if its host is an IP literal, its address. Host names
    /// are checked when they are resolved, at send time.
    pub fn check_url(&self, target: &str) -> Result<Url, TargetError> {
        if target.len() > MAX_TARGET_BYTES {
            return Err(TargetError::Malformed);
        }
        let url = Url::parse(target).map_err(|_| TargetError::Malformed)?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(TargetError::Malformed);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(TargetError::Credentials);
        }
        let ip = match url.host() {
            None => return Err(TargetError::Malformed),
            Some(url::Host::Domain(d)) => {
                // A domain the URL parser left as a name but the resolver would read as an
                // address is not expected after WHATWG parsing; refuse it to be safe.
                match d.parse::<IpAddr>() {
                    Ok(ip) => ip,
                    Err(_) => return Ok(url),
                }
            }
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        };
        if self.ip_allowed(ip) {
            Ok(url)
        } else {
            Err(TargetError::Internal {
                host: url.host_str().unwrap_or_default().to_string(),
                ip,
            })
        }
    }

    /// Resolves `host` and checks every address (all must be allowed: a name that mixes
    /// public and internal addresses is refused).
    pub async fn resolve(&self, host: &str) -> Result<Vec<SocketAddr>, TargetError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|_| TargetError::Unresolved(host.to_string()))?
            .collect();
        if addrs.is_empty() {
            return Err(TargetError::Unresolved(host.to_string()));
        }
        if !self.host_allowed(host) {
            if let Some(bad) = addrs.iter().find(|a| !self.ip_allowed(a.ip())) {
                return Err(TargetError::Internal {
                    host: host.to_string(),
                    ip: bad.ip(),
                });
            }
        }
        Ok(addrs)
    }
}

/// The scheme and host of a target, for logs (paths and queries often carry secrets).
pub fn redacted(target: &str) -> String {
    match Url::parse(target) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
            (Some(h), None) => format!("{}://{h}", u.scheme()),
            _ => "<invalid url>".into(),
        },
        Err(_) => "<invalid url>".into(),
    }
}

/// A reqwest resolver that checks every resolved address against the policy; the client
/// connects to exactly the addresses returned, so nothing is resolved twice.
pub struct GuardedResolver {
    pub policy: Arc<TargetPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = policy.resolve(&host).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// An IPv4-mapped or IPv4-compatible IPv6 address as the IPv4 address it means.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Whether `ip` is a globally routable unicast address (the special-purpose registries
/// of RFC 6890 and its updates, the parts a webhook could abuse).
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                  // "this network"
        || a == 10                            // private
        || a == 127                           // loopback
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 169 && b == 254)             // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 0 && c == 0)     // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)     // documentation
        || (a == 192 && b == 88 && c == 99)   // 6to4 relay anycast
        || (a == 192 && b == 168)             // private
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100)  // documentation
        || (a == 203 && b == 0 && c == 113)   // documentation
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return false;
    }
    // IPv4-compatible (deprecated) ::a.b.c.d and NAT64 64:ff9b::/96: judge the IPv4 inside.
    if s[..6] == [0; 6] || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4]) {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return is_public_v4(v4);
    }
    // 6to4 2002::/16 embeds an IPv4 address too.
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return is_public_v4(v4);
    }
    !((s[0] & 0xfe00) == 0xfc00        // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80   // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0   // site-local (deprecated) fec0::/10
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x2001 && s[1] < 0x0200) // IETF protocol assignments, incl. Teredo
        || s[0] == 0x0100 && s[1..4] == [0; 3]) // discard-only 100::/64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> TargetPolicy {
        TargetPolicy::default()
    }

    #[test]
    fn internal_addresses_are_refused_however_written() {
        for target in [
            "http://127.0.0.1:8080/hook",
            "http://127.1/",
            "http://[::1]/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
        ] {
            let e = strict().check_url(target).unwrap_err();
            assert!(matches!(e, TargetError::Internal { .. }), "{target}: {e:?}");
        }
    }

    #[test]
    fn public_addresses_names_and_allowlisted_ranges_pass() {
        for target in [
            "https://push.example.com/hook/abc",
            "http://93.184.216.34/",
            "http://[2606:4700::1111]/",
        ] {
            strict().check_url(target).unwrap();
        }
        let p =
            TargetPolicy::parse(&["127.0.0.0/8".into(), "::1".into(), "hooks.lan".into()]).unwrap();
        p.check_url("http://127.0.0.1:9/").unwrap();
        p.check_url("http://[::1]/").unwrap();
        assert!(p.check_url("http://10.0.0.1/").is_err());
        assert!(TargetPolicy::parse(&["not a host!".into()]).is_err());
    }

    #[test]
    fn malformed_and_credentialed_targets_are_refused() {
        for target in ["ftp://x", "x", "http://", "mailto:a@b.c"] {
            assert_eq!(
                strict().check_url(target),
                Err(TargetError::Malformed),
                "{target}"
            );
        }
        assert_eq!(
            strict().check_url("https://u:p@example.com/"),
            Err(TargetError::Credentials)
        );
        let long = format!("https://example.com/{}", "a".repeat(MAX_TARGET_BYTES));
        assert_eq!(strict().check_url(&long), Err(TargetError::Malformed));
    }

    #[tokio::test]
    async fn names_that_resolve_to_internal_addresses_are_refused() {
        let e = strict().resolve("localhost").await.unwrap_err();
        assert!(matches!(e, TargetError::Internal { .. }), "{e:?}");
        let allowed = TargetPolicy::parse(&["localhost".into()]).unwrap();
        assert!(!allowed.resolve("localhost").await.unwrap().is_empty());
    }

    #[test]
    fn logs_get_scheme_and_host_only() {
        assert_eq!(
            redacted("https://push.example.com:8443/hook/SECRET?token=abc"),
            "https://push.example.com:8443"
        );
        assert_eq!(redacted("nonsense"), "<invalid url>");
    }
}
