//! URL parsing with the semantics of Go's `net/url`, as far as Kubernetes'
//! CEL URL library needs it: `isURL(s)` is "`url.ParseRequestURI(s)`
//! succeeds", and `url(s)` checks with `ParseRequestURI` then keeps the result
//! of `url.Parse(s)`. A WHATWG parser (the `url` crate) accepts and rejects
//! different strings (it would take `#%blah$#@` relative to nothing as an
//! error for a different reason, normalise hosts, and so on), so the rules of
//! Go's parser are written out here instead.

/// The parts of a parsed URL that the CEL accessors expose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GoUrl {
    /// Lower-cased, as Go stores it.
    pub scheme: String,
    /// Unescaped `host[:port]`, without user info.
    pub host: String,
    pub path: String,
    pub raw_query: String,
}

impl GoUrl {
    /// Go's `URL.Hostname()`: the host without port and IPv6 brackets.
    pub fn hostname(&self) -> &str {
        split_host_port(&self.host).0
    }

    /// Go's `URL.Port()`: the port digits, or "".
    pub fn port(&self) -> &str {
        split_host_port(&self.host).1
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Host,
    Zone,
    Path,
    UserPassword,
    Fragment,
}

/// `url.ParseRequestURI`: an absolute URI or an absolute path; the fragment
/// is not split off.
pub(crate) fn parse_request_uri(raw: &str) -> Result<GoUrl, String> {
    parse_inner(raw, true)
}

/// `url.Parse`: splits off the fragment first, then parses leniently.
pub(crate) fn parse(raw: &str) -> Result<GoUrl, String> {
    let (rest, fragment) = match raw.split_once('#') {
        Some((rest, fragment)) => (rest, Some(fragment)),
        None => (raw, None),
    };
    let url = parse_inner(rest, false)?;
    if let Some(fragment) = fragment {
        unescape(fragment, Mode::Fragment)?;
    }
    Ok(url)
}

fn parse_inner(raw: &str, via_request: bool) -> Result<GoUrl, String> {
    if raw.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("invalid control character in URL".into());
    }
    if raw.is_empty() && via_request {
        return Err("empty url".into());
    }
    let mut url = GoUrl::default();
    if raw == "*" {
        url.path = "*".into();
        return Ok(url);
    }
    let (scheme, mut rest) = split_scheme(raw)?;
    url.scheme = scheme.to_ascii_lowercase();

    if rest.ends_with('?') && rest.matches('?').count() == 1 {
        // ForceQuery: an empty query.
        rest = &rest[..rest.len() - 1];
    } else if let Some((before, query)) = rest.split_once('?') {
        url.raw_query = query.to_owned();
        rest = before;
    }

    if !rest.starts_with('/') {
        if !url.scheme.is_empty() {
            // Rootless ("opaque") URL such as `mailto:x`: no host or path.
            return Ok(url);
        }
        if via_request {
            return Err("invalid URI for request".into());
        }
        let first_segment = rest.split('/').next().unwrap_or_default();
        if first_segment.contains(':') {
            return Err("first path segment in URL cannot contain colon".into());
        }
    }

    if (!url.scheme.is_empty() || !via_request && !rest.starts_with("///"))
        && rest.starts_with("//")
    {
        let after = &rest[2..];
        let (authority, path) = match after.find('/') {
            Some(i) => after.split_at(i),
            None => (after, ""),
        };
        url.host = parse_authority(authority)?;
        rest = path;
    }
    url.path = unescape(rest, Mode::Path)?;
    Ok(url)
}

/// Go's `getScheme`: a scheme is letters first, then letters, digits, `+`,
/// `-` or `.`, up to a colon. Anything else means "no scheme" (not an error),
/// except a leading colon.
fn split_scheme(raw: &str) -> Result<(&str, &str), String> {
    for (i, c) in raw.bytes().enumerate() {
        match c {
            b'a'..=b'z' | b'A'..=b'Z' => {}
            b'0'..=b'9' | b'+' | b'-' | b'.' => {
                if i == 0 {
                    return Ok(("", raw));
                }
            }
            b':' => {
                if i == 0 {
                    return Err("missing protocol scheme".into());
                }
                return Ok((&raw[..i], &raw[i + 1..]));
            }
            _ => return Ok(("", raw)),
        }
    }
    Ok(("", raw))
}

/// Parses `[userinfo@]host[:port]` and returns the unescaped host.
fn parse_authority(authority: &str) -> Result<String, String> {
    let (userinfo, host) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let host = parse_host(host)?;
    if let Some(userinfo) = userinfo {
        if !valid_userinfo(userinfo) {
            return Err("net/url: invalid userinfo".into());
        }
        match userinfo.split_once(':') {
            Some((user, password)) => {
                unescape(user, Mode::UserPassword)?;
                unescape(password, Mode::UserPassword)?;
            }
            None => {
                unescape(userinfo, Mode::UserPassword)?;
            }
        }
    }
    Ok(host)
}

fn parse_host(host: &str) -> Result<String, String> {
    if host.starts_with('[') {
        let Some(close) = host.rfind(']') else {
            return Err("missing ']' in host".into());
        };
        let colon_port = &host[close + 1..];
        if !valid_optional_port(colon_port) {
            return Err(format!("invalid port {colon_port:?} after host"));
        }
        // An IPv6 zone, `[fe80::1%25en0]`, has its own escaping rules.
        if let Some(zone) = host[..close].find("%25") {
            let mut out = unescape(&host[..zone], Mode::Host)?;
            out.push_str(&unescape(&host[zone..close], Mode::Zone)?);
            out.push_str(&unescape(&host[close..], Mode::Host)?);
            return Ok(out);
        }
    } else if let Some(colon) = host.rfind(':') {
        let colon_port = &host[colon..];
        if !valid_optional_port(colon_port) {
            return Err(format!("invalid port {colon_port:?} after host"));
        }
    }
    unescape(host, Mode::Host)
}

/// `""`, or `:` followed by digits only.
fn valid_optional_port(port: &str) -> bool {
    match port.strip_prefix(':') {
        _ if port.is_empty() => true,
        Some(digits) => digits.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// RFC 3986's userinfo characters (unreserved, sub-delims, `:`, and `%` for
/// escapes), plus `@`, which Go tolerates. Non-ASCII is rejected.
fn valid_userinfo(s: &str) -> bool {
    s.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b':'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
                    | b'@'
            )
    })
}

/// Whether an ASCII byte must be escaped in a host (Go's `shouldEscape` for
/// `encodeHost`/`encodeZone`, the only modes where it is checked on input).
fn host_byte_needs_escape(c: u8) -> bool {
    !(c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'-' | b'_'
                | b'.'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'['
                | b']'
                | b'<'
                | b'>'
                | b'"'
        ))
}

fn unhex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

/// Go's `unescape`: every `%` must start a two-digit hex escape; in a host
/// only non-ASCII bytes may be escaped (and `%25`, for IPv6 zones), and
/// ASCII characters outside the allowed set are errors.
fn unescape(s: &str, mode: Mode) -> Result<String, String> {
    let b = s.as_bytes();
    let escape_error = |i: usize| {
        let end = (i + 3).min(b.len());
        format!(
            "invalid URL escape {:?}",
            String::from_utf8_lossy(&b[i..end])
        )
    };
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                if i + 2 >= b.len()
                    || !b[i + 1].is_ascii_hexdigit()
                    || !b[i + 2].is_ascii_hexdigit()
                {
                    return Err(escape_error(i));
                }
                let is_pct25 = &b[i..i + 3] == b"%25";
                let v = (unhex(b[i + 1]) << 4) | unhex(b[i + 2]);
                if mode == Mode::Host && unhex(b[i + 1]) < 8 && !is_pct25 {
                    return Err(escape_error(i));
                }
                if mode == Mode::Zone && !is_pct25 && v != b' ' && host_byte_needs_escape(v) {
                    return Err(escape_error(i));
                }
                out.push(v);
                i += 3;
            }
            c => {
                if matches!(mode, Mode::Host | Mode::Zone) && c < 0x80 && host_byte_needs_escape(c)
                {
                    return Err(format!("invalid character {:?} in host name", c as char));
                }
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Go's `splitHostPort` on an already parsed host.
fn split_host_port(host_port: &str) -> (&str, &str) {
    let (mut host, mut port) = (host_port, "");
    if let Some(colon) = host_port.rfind(':')
        && valid_optional_port(&host_port[colon..])
    {
        host = &host_port[..colon];
        port = &host_port[colon + 1..];
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        host = inner;
    }
    (host, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_uris_go_accepts() {
        for ok in [
            "http://test",
            "file:///opt/filters/openid.wasm",
            "oci://ghcr.io/a/b:v1",
            "/just/a/path",
            "http://[::1]:8080/x",
            "http://user:pa%20ss@host/",
            "fake://example.com",
            "http://",
            "mailto:someone",
            "*",
        ] {
            assert!(parse_request_uri(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn request_uris_go_rejects() {
        for bad in [
            "",
            "test",
            "#%blah$#@",
            "http://#%blah$#@",
            ":nothing",
            "http://host:port/",
            "http://ho st/",
            "http://[::1/",
            "http://host/%zz",
            "http://a\u{1}b/",
        ] {
            assert!(parse_request_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parts() {
        let url = parse("HTTPS://user@Example.com:8443/a%20b?q=1#frag").unwrap();
        assert_eq!(url.scheme, "https");
        assert_eq!(url.host, "Example.com:8443");
        assert_eq!(url.hostname(), "Example.com");
        assert_eq!(url.port(), "8443");
        assert_eq!(url.path, "/a b");
        assert_eq!(url.raw_query, "q=1");
        let v6 = parse("http://[::1]/").unwrap();
        assert_eq!((v6.hostname(), v6.port()), ("::1", ""));
    }
}
