//! Who may call the HTTP API (DESIGN §6 "Who may call").
//!
//! - **Tokens.** `[[http.tokens]]` hold a name, the SHA-256 of a bearer
//!   token (never the token) and its scopes. A request's token is hashed and
//!   compared with every configured hash in constant time. With tokens, every
//!   path but `/healthz` and `/readyz` needs one: 401 without, 403 outside
//!   its scopes. Without tokens the API is open, and the config refuses a
//!   non-loopback listen unless `allow_anonymous`.
//! - **Scopes.** `read` (GET), `query` (`POST /api/v1/query`, preview),
//!   `ack` (`POST /api/v1/alerts/{id}/ack`), `admin` (all).
//! - **Browsers.** A POST must say `Content-Type: application/json` (a form
//!   or a `text/plain` fetch from another site cannot), a POST's `Origin`,
//!   when a browser sends one, must be the API's own, and on a loopback
//!   listen the `Host` must be a loopback name (DNS rebinding), unless
//!   `http.allowed_hosts` lists it.

use std::net::SocketAddr;

use axum::http::{header, HeaderMap, Method};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Query,
    Ack,
    Admin,
}

impl Scope {
    pub fn parse(text: &str) -> Result<Scope, String> {
        match text.trim() {
            "read" => Ok(Scope::Read),
            "query" => Ok(Scope::Query),
            "ack" => Ok(Scope::Ack),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "unknown scope {other:?}: expected read, query, ack or admin"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Query => "query",
            Scope::Ack => "ack",
            Scope::Admin => "admin",
        }
    }
}

/// One `[[http.tokens]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    /// Lowercase hex SHA-256 of the token.
    pub token_sha256: String,
    pub scopes: Vec<Scope>,
}

impl TokenConfig {
    pub fn check(&self) -> Result<[u8; 32], String> {
        let bytes = hex::decode(self.token_sha256.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                format!(
                    "token {:?}: token_sha256 must be 64 hex digits (the SHA-256 of the token)",
                    self.name
                )
            })?;
        if self.scopes.is_empty() {
            return Err(format!("token {:?}: no scopes", self.name));
        }
        Ok(bytes)
    }
}

/// Why a request is turned away: status, code, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

fn denied(status: u16, code: &'static str, message: impl Into<String>) -> Denied {
    Denied {
        status,
        code,
        message: message.into(),
    }
}

/// The API's gatekeeper, built once from `[http]`.
#[derive(Debug, Clone)]
pub struct HttpAuth {
    tokens: Vec<(String, [u8; 32], Vec<Scope>)>,
    allowed_hosts: Vec<String>,
    loopback: bool,
}

/// The SHA-256 of a token, as the config holds it.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token: `weir_` and 43 base64url characters (256 bits).
pub fn new_token() -> String {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    use base64::Engine;
    format!(
        "weir_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// What a request needs: `None` for the open health probes.
pub fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    if path == "/healthz" || path == "/readyz" {
        return None;
    }
    // The dashboard's page and assets hold no data: the page asks for a
    // token and sends it with every API call it makes.
    if (method == Method::GET || method == Method::HEAD)
        && (path == "/" || path.starts_with("/ui/"))
    {
        return None;
    }
    if method == Method::GET || method == Method::HEAD {
        return Some(Scope::Read);
    }
    if method == Method::POST {
        if path == "/api/v1/query" || path == "/api/v1/pipelines/preview" {
            return Some(Scope::Query);
        }
        if path.starts_with("/api/v1/alerts/") && path.ends_with("/ack") {
            return Some(Scope::Ack);
        }
    }
    Some(Scope::Admin)
}

impl HttpAuth {
    pub fn new(
        tokens: &[TokenConfig],
        allowed_hosts: &[String],
        listen: SocketAddr,
    ) -> Result<HttpAuth, String> {
        let mut checked = Vec::new();
        for token in tokens {
            checked.push((token.name.clone(), token.check()?, token.scopes.clone()));
        }
        Ok(HttpAuth {
            tokens: checked,
            allowed_hosts: allowed_hosts.iter().map(|h| h.to_lowercase()).collect(),
            loopback: listen.ip().is_loopback(),
        })
    }

    pub fn open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Lets the request through (the token's name, if any) or says why not.
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Option<String>, Denied> {
        self.check_host(headers)?;
        if method == Method::POST {
            check_origin(headers)?;
            let json = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
            if !json {
                return Err(denied(
                    415,
                    "unsupported_media_type",
                    "a POST body must be sent as Content-Type: application/json",
                ));
            }
        }
        let Some(scope) = required_scope(method, path) else {
            return Ok(None);
        };
        if self.tokens.is_empty() {
            return Ok(None);
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let Some(presented) = presented else {
            return Err(denied(
                401,
                "unauthorized",
                "this API needs a token: Authorization: Bearer <token>",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every configured token is compared, each in constant time.
        let mut found: Option<&(String, [u8; 32], Vec<Scope>)> = None;
        for token in &self.tokens {
            if bool::from(token.1.ct_eq(&digest)) {
                found = Some(token);
            }
        }
        let Some((name, _, scopes)) = found else {
            return Err(denied(401, "unauthorized", "unknown token"));
        };
        if scopes.contains(&Scope::Admin) || scopes.contains(&scope) {
            Ok(Some(name.clone()))
        } else {
            Err(denied(
                403,
                "forbidden",
                format!(
                    "token {name:?} lacks the {:?} scope this request needs",
                    scope.as_str()
                ),
            ))
        }
    }

    fn check_host(&self, headers: &HeaderMap) -> Result<(), Denied> {
        if self.allowed_hosts.is_empty() && !self.loopback {
            return Ok(());
        }
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(host_name)
            .unwrap_or_default();
        let allowed =
            self.allowed_hosts.contains(&host) || (self.loopback && is_loopback_name(&host));
        if allowed {
            Ok(())
        } else {
            Err(denied(
                403,
                "host_not_allowed",
                format!("Host {host:?} is not one this API answers to (http.allowed_hosts)"),
            ))
        }
    }
}

/// `host` of `host:port` or `[v6]:port`, lowercase.
fn host_name(value: &str) -> String {
    let value = value.trim().to_lowercase();
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    match value.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.to_string(),
        _ => value,
    }
}

fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A browser's cross-site POST carries an `Origin` that is not ours.
fn check_origin(headers: &HeaderMap) -> Result<(), Denied> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("null");
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'))
        .unwrap_or_default();
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(denied(
            403,
            "origin_not_allowed",
            format!("a POST from origin {origin:?} is not allowed"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn auth(tokens: &[(&str, &str, &[Scope])]) -> HttpAuth {
        let tokens: Vec<TokenConfig> = tokens
            .iter()
            .map(|(name, token, scopes)| TokenConfig {
                name: name.to_string(),
                token_sha256: token_digest(token),
                scopes: scopes.to_vec(),
            })
            .collect();
        HttpAuth::new(&tokens, &[], "127.0.0.1:8080".parse().unwrap()).unwrap()
    }

    #[test]
    fn scopes_by_method_and_path() {
        assert_eq!(required_scope(&Method::GET, "/healthz"), None);
        assert_eq!(required_scope(&Method::GET, "/readyz"), None);
        assert_eq!(required_scope(&Method::GET, "/metrics"), Some(Scope::Read));
        assert_eq!(
            required_scope(&Method::POST, "/api/v1/query"),
            Some(Scope::Query)
        );
        assert_eq!(
            required_scope(&Method::POST, "/api/v1/alerts/abc/ack"),
            Some(Scope::Ack)
        );
        assert_eq!(
            required_scope(&Method::POST, "/api/v1/pipelines/reload"),
            Some(Scope::Admin)
        );
        assert_eq!(
            required_scope(&Method::DELETE, "/api/v1/alerts"),
            Some(Scope::Admin)
        );
    }

    #[test]
    fn tokens_and_scopes() {
        let a = auth(&[
            ("dash", "tok-read", &[Scope::Read]),
            ("ops", "tok-admin", &[Scope::Admin]),
        ]);
        let host = ("host", "127.0.0.1:8080");
        let get = |h: HeaderMap| a.check(&Method::GET, "/api/v1/views", &h);
        assert_eq!(get(headers(&[host])).unwrap_err().status, 401);
        assert_eq!(
            get(headers(&[host, ("authorization", "Bearer nope")]))
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            get(headers(&[host, ("authorization", "Bearer tok-read")])),
            Ok(Some("dash".into()))
        );
        let post = |h: HeaderMap| a.check(&Method::POST, "/api/v1/query", &h);
        let json = ("content-type", "application/json");
        let e = post(headers(&[host, json, ("authorization", "Bearer tok-read")])).unwrap_err();
        assert_eq!((e.status, e.code), (403, "forbidden"));
        assert_eq!(
            post(headers(&[
                host,
                json,
                ("authorization", "Bearer tok-admin")
            ])),
            Ok(Some("ops".into()))
        );
        // health probes stay open
        assert_eq!(
            a.check(&Method::GET, "/readyz", &headers(&[host])),
            Ok(None)
        );
    }

    #[test]
    fn browsers_cannot_post_across_sites_or_rebind() {
        let a = auth(&[]);
        let ok = headers(&[
            ("host", "localhost:8080"),
            ("content-type", "application/json"),
        ]);
        assert_eq!(a.check(&Method::POST, "/api/v1/query", &ok), Ok(None));
        let form = headers(&[
            ("host", "localhost:8080"),
            ("content-type", "application/x-www-form-urlencoded"),
        ]);
        assert_eq!(
            a.check(&Method::POST, "/api/v1/query", &form)
                .unwrap_err()
                .status,
            415
        );
        let cross = headers(&[
            ("host", "localhost:8080"),
            ("content-type", "application/json"),
            ("origin", "https://evil.example"),
        ]);
        assert_eq!(
            a.check(&Method::POST, "/api/v1/alerts/x/ack", &cross)
                .unwrap_err()
                .code,
            "origin_not_allowed"
        );
        let same = headers(&[
            ("host", "localhost:8080"),
            ("content-type", "application/json"),
            ("origin", "http://localhost:8080"),
        ]);
        assert_eq!(
            a.check(&Method::POST, "/api/v1/alerts/x/ack", &same),
            Ok(None)
        );
        let rebound = headers(&[("host", "evil.example")]);
        assert_eq!(
            a.check(&Method::GET, "/api/v1/views", &rebound)
                .unwrap_err()
                .code,
            "host_not_allowed"
        );
        for host in ["127.0.0.1:1", "[::1]:8080", "localhost", "app.localhost:9"] {
            let h = headers(&[("host", host)]);
            assert_eq!(a.check(&Method::GET, "/metrics", &h), Ok(None), "{host}");
        }
    }

    #[test]
    fn new_tokens_are_random_and_hash_as_configured() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("weir_") && a.len() == 5 + 43, "{a}");
        assert_eq!(token_digest(&a).len(), 64);
        let config = TokenConfig {
            name: "x".into(),
            token_sha256: "zz".into(),
            scopes: vec![Scope::Read],
        };
        assert!(config.check().unwrap_err().contains("64 hex digits"));
    }
}
