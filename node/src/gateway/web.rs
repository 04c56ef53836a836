//! The web client: the single page and its ES modules (`node/web/`), embedded in the binary
//! and served at `/` and `/assets/{file}` with a Content-Security-Policy that allows no
//! inline script, exact content types, and revalidation by `ETag` (the files change only
//! with the binary).

use std::sync::{Arc, OnceLock};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::domain::error::ApiError;
use crate::node::Node;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_str!("../../web/index.html"),
};

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../web/app.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/api.js"),
    },
    Asset {
        name: "chat.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/chat.js"),
    },
    Asset {
        name: "conn.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/conn.js"),
    },
    Asset {
        name: "store.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/store.js"),
    },
];

/// The policy of every web response. Scripts and styles come only from this origin (no
/// inline script, no `eval`); the page connects to this origin, to WebSockets (the node's
/// own, or another member's after a failover) and to the cluster's other members for
/// `/v1/discover` (added per response by [`policy`]).
const CSP_BASE: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; \
     connect-src 'self' ws: wss:";

/// `GET /`: the page.
pub async fn index(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    static TAG: OnceLock<String> = OnceLock::new();
    let policy = policy(&node).await;
    serve(&INDEX, etag(&TAG, &INDEX), &headers, &policy)
}

/// `GET /assets/{file}`: one of the page's modules or its stylesheet.
pub async fn asset(
    State(node): State<Arc<Node>>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let Some(i) = ASSETS.iter().position(|a| a.name == file) else {
        return ApiError::not_found("no such route").into_response();
    };
    let tags = TAGS.get_or_init(|| ASSETS.iter().map(hash).collect());
    serve(&ASSETS[i], &tags[i], &headers, &policy(&node).await)
}

fn etag<'a>(cell: &'a OnceLock<String>, asset: &Asset) -> &'a str {
    cell.get_or_init(|| hash(asset))
}

fn hash(asset: &Asset) -> String {
    let digest = Sha256::digest(asset.body.as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

/// The CSP with the HTTP origins of the cluster's members in `connect-src`.
async fn policy(node: &Node) -> String {
    let mut csp = CSP_BASE.to_string();
    for m in node.members().await {
        if let Some(origin) = http_origin(&m.ws_url) {
            csp.push(' ');
            csp.push_str(&origin);
        }
    }
    csp
}

/// `ws://host:port/v1/ws` -> `http://host:port` (`wss` -> `https`); None for anything else
/// or for characters that do not belong in a header.
fn http_origin(ws_url: &str) -> Option<String> {
    let (scheme, rest) = if let Some(r) = ws_url.strip_prefix("ws://") {
        ("http", r)
    } else if let Some(r) = ws_url.strip_prefix("wss://") {
        ("https", r)
    } else {
        return None;
    };
    let authority = rest.split('/').next()?;
    let ok = !authority.is_empty()
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    ok.then(|| format!("{scheme}://{authority}"))
}

fn serve(asset: &Asset, tag: &str, request: &HeaderMap, csp: &str) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        metrics::counter!("web_assets_served_total").increment(1);
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_from_ws_urls() {
        assert_eq!(
            http_origin("ws://127.0.0.1:9001/v1/ws").as_deref(),
            Some("http://127.0.0.1:9001")
        );
        assert_eq!(
            http_origin("wss://chat.example/v1/ws").as_deref(),
            Some("https://chat.example")
        );
        assert_eq!(
            http_origin("ws://[::1]:80/v1/ws").as_deref(),
            Some("http://[::1]:80")
        );
        assert_eq!(http_origin("http://x/v1/ws"), None);
        assert_eq!(http_origin("ws://a;b/v1/ws"), None);
        assert_eq!(http_origin("ws:///v1/ws"), None);
    }

    #[test]
    fn every_module_the_page_imports_is_served() {
        let names: Vec<&str> = ASSETS.iter().map(|a| a.name).collect();
        for a in ASSETS.iter().chain(std::iter::once(&INDEX)) {
            for part in a
                .body
                .split("./")
                .skip(1)
                .chain(a.body.split("/assets/").skip(1))
            {
                let file: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                    .collect();
                if file.ends_with(".js") || file.ends_with(".css") {
                    assert!(names.contains(&file.as_str()), "{} needs {file}", a.name);
                }
            }
        }
        assert!(!INDEX.body.contains("<script>"), "no inline script");
    }
}
