//! Request paths in one canonical form before anything matches or authorizes them.
//!
//! A backend that resolves `/echo/../admin` to `/admin` must not be reachable past a route
//! that matched the `/echo` prefix, or past a deny rule on `/admin`. So, as Envoy's
//! `normalize_path` does (RFC 3986 section 6): percent-encoded unreserved characters are decoded
//! (`%2e` is `.`, `%41` is `A`), dot segments are removed (section 5.2.4), and the proxies
//! match, authorize and forward the result. Encoded reserved characters such as `%2F` are left
//! as they are: decoding them would change what the path means. A malformed escape is refused.

use std::borrow::Cow;

use http::Uri;

/// Why a path cannot be normalized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("malformed percent-encoding in the path")]
    BadEscape,
}

/// `path` in canonical form; borrowed when it already is. With `merge_slashes` (the config's
/// `mesh.merge_slashes`), runs of `/` become one, as most file-serving backends read them.
pub fn normalize(path: &str, merge_slashes: bool) -> Result<Cow<'_, str>, PathError> {
    // Most paths have nothing to do: no escapes, no dot segments, no doubled slash.
    let dotted = path.split('/').any(|s| s == "." || s == "..");
    let doubled = merge_slashes && path.contains("//");
    if !(path.contains('%') || dotted || doubled) {
        return Ok(Cow::Borrowed(path));
    }
    let mut decoded = decode_unreserved(path)?;
    if !decoded.starts_with('/') {
        return Ok(Cow::Owned(decoded));
    }
    if merge_slashes {
        let mut merged = String::with_capacity(decoded.len());
        for c in decoded.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        decoded = merged;
    }
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// The URI with its path normalized; `None` when it already was.
pub fn normalize_uri(uri: &Uri, merge_slashes: bool) -> Result<Option<Uri>, PathError> {
    let Cow::Owned(path) = normalize(uri.path(), merge_slashes)? else { return Ok(None) };
    let mut parts = uri.clone().into_parts();
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    parts.path_and_query = Some(pq.parse().map_err(|_| PathError::BadEscape)?);
    Ok(Some(Uri::from_parts(parts).map_err(|_| PathError::BadEscape)?))
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Decodes `%XX` where XX is an unreserved character; other escapes stay, upper-cased.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // `path` is a str, so a run of non-escape bytes is whole characters.
            let end = bytes[i..].iter().position(|&b| b == b'%').map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (Some(hi), Some(lo)) = (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        else {
            return Err(PathError::BadEscape);
        };
        let b = hi << 4 | lo;
        if unreserved(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push_str(&format!("{b:02X}"));
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 section 5.2.4 for an absolute path: `.` segments go, `..` removes the one before
/// (never above the root); a path ending in either keeps its trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "." => {}
            ".." => {
                kept.pop();
            }
            other => {
                kept.push(other);
                continue;
            }
        }
        if last {
            kept.push("");
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &kept {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_and_unreserved_escapes_are_resolved() {
        let cases = [
            ("/", "/"),
            ("/echo", "/echo"),
            ("/echo/../admin", "/admin"),
            ("/echo/%2e%2e/admin", "/admin"),
            ("/echo/%2E%2e/admin", "/admin"),
            ("/echo/./x", "/echo/x"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/ech%6f", "/echo"),
            ("/a%2fb/../c", "/c"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2fb", "/a%2Fb"),
            ("/%7euser", "/~user"),
            ("/a//b/../c", "/a//c"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input, false).unwrap(), want, "{input}");
        }
        assert!(matches!(normalize("/plain/path", false).unwrap(), Cow::Borrowed(_)), "nothing to do: no copy");
        assert!(matches!(normalize("/a//b", false).unwrap(), Cow::Borrowed(_)), "slashes kept unless asked");
        for (input, want) in [("/a//b", "/a/b"), ("//a///b/", "/a/b/"), ("/a//..//b", "/b"), ("/a/%2f/b", "/a/%2F/b")] {
            assert_eq!(normalize(input, true).unwrap(), want, "{input}, merging slashes");
        }
    }

    #[test]
    fn malformed_escapes_are_refused() {
        for bad in ["/a%", "/a%2", "/a%zz", "/%g0"] {
            assert_eq!(normalize(bad, false), Err(PathError::BadEscape), "{bad}");
        }
    }

    #[test]
    fn the_query_is_kept() {
        let uri: Uri = "/echo/../x?a=1&b=%2e".parse().unwrap();
        assert_eq!(normalize_uri(&uri, false).unwrap().unwrap(), "/x?a=1&b=%2e");
        let plain: Uri = "/x?y".parse().unwrap();
        assert!(normalize_uri(&plain, true).unwrap().is_none());
    }
}
