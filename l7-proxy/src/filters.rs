//! Gateway API HTTP filters that change requests and responses in place:
//! header modifiers, redirects and URL rewrites. (Mirrors are sent by the
//! forwarding path.)

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, request::Parts};

use crate::config::{HeaderModifier, PathModifier, RequestRedirect, UrlRewrite};

/// Applies `set`, then `add`, then `remove`. Invalid names or values (the
/// agent should have rejected them) are skipped.
pub fn modify_headers(m: &HeaderModifier, h: &mut HeaderMap) {
    for p in &m.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(p.name.as_bytes()),
            HeaderValue::from_str(&p.value),
        ) {
            h.insert(n, v);
        }
    }
    for p in &m.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(p.name.as_bytes()),
            HeaderValue::from_str(&p.value),
        ) {
            h.append(n, v);
        }
    }
    for name in &m.remove {
        h.remove(name.as_str());
    }
}

/// `ReplacePrefixMatch`: the matched prefix (whole path elements) of `path`
/// becomes `replacement`.
pub fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.get(prefix.len()..).unwrap_or("");
    let base = replacement.trim_end_matches('/');
    let out = if rest.is_empty() {
        if replacement.is_empty() {
            "/".to_string()
        } else {
            replacement.to_string()
        }
    } else {
        format!("{base}{rest}")
    };
    if out.starts_with('/') {
        out
    } else {
        format!("/{out}")
    }
}

fn modified_path(m: &PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    match m {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(r) => {
            replace_prefix(path, matched_prefix.unwrap_or("/"), r)
        }
    }
}

/// The host (without port) and port of the request's authority.
fn host_and_port(parts: &Parts) -> (String, Option<u16>) {
    let auth = parts
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    match auth.parse::<http::uri::Authority>() {
        Ok(a) => (a.host().to_string(), a.port_u16()),
        Err(_) => (auth, None),
    }
}

/// The status and `Location` of a `RequestRedirect`. `service_port`: the
/// port the request reached (the Gateway API's listener port), kept when the
/// redirect names neither a scheme nor a port.
pub fn redirect(
    r: &RequestRedirect,
    parts: &Parts,
    matched_prefix: Option<&str>,
    service_port: Option<u16>,
) -> (StatusCode, String) {
    // The codes the Gateway API allows; 302 when none is given.
    let status = match r.status_code {
        Some(301) => StatusCode::MOVED_PERMANENTLY,
        Some(303) => StatusCode::SEE_OTHER,
        Some(307) => StatusCode::TEMPORARY_REDIRECT,
        Some(308) => StatusCode::PERMANENT_REDIRECT,
        _ => StatusCode::FOUND,
    };
    let (host, port) = host_and_port(parts);
    let scheme = r.scheme.clone().unwrap_or_else(|| "http".into());
    let host = r.hostname.clone().unwrap_or(host);
    // Gateway API: with a new scheme and no port, the scheme's default port.
    let port = r.port.or(if r.scheme.is_some() {
        None
    } else {
        service_port.or(port)
    });
    let port = port.filter(|p| !matches!((scheme.as_str(), p), ("http", 80) | ("https", 443)));
    let path = match &r.path {
        Some(m) => modified_path(m, parts.uri.path(), matched_prefix),
        None => parts.uri.path().to_string(),
    };
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    if host.is_empty() {
        // No host to name (an HTTP/1.0 request without `Host`, and the
        // redirect names none): a reference relative to the request's own
        // (RFC 9110 10.2.2) rather than `http:///path`; one starting `//`
        // would name another host, `/.//` keeps it a path.
        let dot = if path.starts_with("//") { "/." } else { "" };
        return (status, format!("{dot}{path}{query}"));
    }
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    (status, format!("{scheme}://{host}{port}{path}{query}"))
}

/// Applies a `URLRewrite` to the request.
pub fn rewrite(u: &UrlRewrite, parts: &mut Parts, matched_prefix: Option<&str>) {
    if let Some(host) = &u.hostname
        && let Ok(v) = HeaderValue::from_str(host)
    {
        parts.headers.insert(http::header::HOST, v);
        if let Some(auth) = parts.uri.authority().cloned() {
            let new = match auth.port_u16() {
                Some(p) => format!("{host}:{p}"),
                None => host.clone(),
            };
            let mut up = std::mem::take(&mut parts.uri).into_parts();
            up.authority = new.parse().ok().or(Some(auth));
            parts.uri = Uri::from_parts(up).unwrap_or_default();
        }
    }
    if let Some(m) = &u.path {
        let path = modified_path(m, parts.uri.path(), matched_prefix);
        parts.uri = with_path(&parts.uri, &path).unwrap_or_default();
    }
}

/// `uri` with its path replaced by `path` (the query kept); `None` when
/// that is no valid URI.
pub fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut up = uri.clone().into_parts();
    up.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(up).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderPair;

    fn parts(uri: &str, host: &str) -> Parts {
        let (p, _) = http::Request::builder()
            .uri(uri)
            .header("host", host)
            .body(())
            .unwrap()
            .into_parts();
        p
    }

    #[test]
    fn prefix_replacement() {
        assert_eq!(replace_prefix("/foo/bar", "/foo", "/xyz"), "/xyz/bar");
        assert_eq!(replace_prefix("/foo/bar", "/foo/", "/"), "/bar");
        assert_eq!(replace_prefix("/foo", "/foo", "/xyz"), "/xyz");
        assert_eq!(replace_prefix("/foo/", "/foo", "/xyz"), "/xyz/");
        assert_eq!(replace_prefix("/foo", "/foo", "/"), "/");
        assert_eq!(replace_prefix("/foo/bar", "/foo", ""), "/bar");
    }

    #[test]
    fn header_modifier_sets_adds_removes() {
        let mut h = HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        h.insert("gone", "x".parse().unwrap());
        modify_headers(
            &HeaderModifier {
                set: vec![HeaderPair {
                    name: "a".into(),
                    value: "2".into(),
                }],
                add: vec![
                    HeaderPair {
                        name: "b".into(),
                        value: "3".into(),
                    },
                    HeaderPair {
                        name: "b".into(),
                        value: "4".into(),
                    },
                ],
                remove: vec!["gone".into()],
            },
            &mut h,
        );
        assert_eq!(h.get("a").unwrap(), "2");
        assert_eq!(h.get_all("b").iter().collect::<Vec<_>>(), ["3", "4"]);
        assert!(h.get("gone").is_none());
    }

    #[test]
    fn redirects() {
        let p = parts("/old/page?x=1", "shop.example:8080");
        let r = RequestRedirect {
            path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
            ..Default::default()
        };
        assert_eq!(
            redirect(&r, &p, Some("/old"), None),
            (
                StatusCode::FOUND,
                "http://shop.example:8080/new/page?x=1".into()
            )
        );
        let r = RequestRedirect {
            scheme: Some("https".into()),
            hostname: Some("secure.example".into()),
            status_code: Some(301),
            ..Default::default()
        };
        assert_eq!(
            redirect(&r, &p, None, None),
            (
                StatusCode::MOVED_PERMANENTLY,
                "https://secure.example/old/page?x=1".into()
            )
        );
        // Every code the Gateway API allows is answered as given (a 307
        // keeps a POST a POST).
        for (code, want) in [
            (303, StatusCode::SEE_OTHER),
            (307, StatusCode::TEMPORARY_REDIRECT),
            (308, StatusCode::PERMANENT_REDIRECT),
        ] {
            let r = RequestRedirect {
                status_code: Some(code),
                ..Default::default()
            };
            assert_eq!(redirect(&r, &p, None, None).0, want);
        }
        // No port in the Host: the port the request reached (the Service's)
        // is kept; with a new scheme, that scheme's default port.
        let bare = parts("/a", "shop.example");
        let r = RequestRedirect {
            hostname: Some("new.example".into()),
            ..Default::default()
        };
        assert_eq!(
            redirect(&r, &bare, None, Some(8080)).1,
            "http://new.example:8080/a"
        );
        let r = RequestRedirect {
            scheme: Some("https".into()),
            ..Default::default()
        };
        assert_eq!(
            redirect(&r, &bare, None, Some(8080)).1,
            "https://shop.example/a"
        );
        // No Host at all (HTTP/1.0): a relative reference.
        let (hostless, _) = http::Request::builder()
            .uri("/old/page?x=1")
            .body(())
            .unwrap()
            .into_parts();
        let r = RequestRedirect {
            path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
            ..Default::default()
        };
        assert_eq!(
            redirect(&r, &hostless, Some("/old"), Some(80)).1,
            "/new/page?x=1"
        );
        // Never a scheme-relative reference to another host.
        let (evil, _) = http::Request::builder()
            .uri("//evil.example/x")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(
            redirect(&RequestRedirect::default(), &evil, None, Some(80)).1,
            "/.//evil.example/x"
        );
    }

    #[test]
    fn rewrites() {
        let mut p = parts("http://cart/api/v1/items?q=2", "cart");
        rewrite(
            &UrlRewrite {
                hostname: Some("cart-v2".into()),
                path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
            },
            &mut p,
            Some("/api/v1"),
        );
        assert_eq!(p.uri.to_string(), "http://cart-v2/v2/items?q=2");
        assert_eq!(p.headers.get("host").unwrap(), "cart-v2");
    }
}
