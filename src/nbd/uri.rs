//! NBD addresses, after the NBD URI scheme (`doc/uri.md` of the NBD project): `nbd://HOST[:PORT]/EXPORT` (TCP,
//! default port 10809; also `nbd+tcp://`) and `nbd+unix:///EXPORT?socket=PATH` (a Unix socket). The export name
//! is the path without its leading `/`, percent-decoded; it may be empty. TLS (`nbds://`) is refused: the export
//! is expected on the same host or a private link (QEMU's backup pull mode serves it on a local socket).

use std::fmt;
use std::path::PathBuf;

/// The default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A TCP host (name, IPv4, or IPv6 without brackets) and port.
    Tcp {
        /// The host.
        host: String,
        /// The port.
        port: u16,
    },
    /// A Unix socket path.
    Unix(PathBuf),
}

/// A parsed NBD URI: transport and export name, and the text it was parsed from (for logs and errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// Where to connect.
    pub transport: Transport,
    /// The export name (may be empty: the server's default export).
    pub export: String,
    uri: String,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl Address {
    /// Whether `text` is meant as an NBD URI (it names an NBD scheme), so that a file path is never taken for one.
    pub fn is_nbd_uri(text: &str) -> bool {
        [
            "nbd://",
            "nbd+tcp://",
            "nbd+unix://",
            "nbds://",
            "nbds+tcp://",
            "nbds+unix://",
        ]
        .iter()
        .any(|s| text.starts_with(s))
    }

    /// The URI as given.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Parses an NBD URI; the error says what is wrong with it, in one line.
    pub fn parse(text: &str) -> Result<Address, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("{text:?} is not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"))?;
        let unix = match scheme {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+tcp" | "nbds+unix" => {
                return Err(format!("{text}: NBD over TLS (nbds) is not supported"))
            }
            other => return Err(format!("{text}: unknown NBD URI scheme {other:?}")),
        };
        if text.contains('#') {
            return Err(format!("{text}: an NBD URI has no fragment"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = decode(path).map_err(|e| format!("{text}: export name: {e}"))?;
        let mut socket = None;
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value).map_err(|e| format!("{text}: query {key}: {e}"))?;
            // doc/uri.md: unknown query parameters are ignored; the TLS ones only matter for nbds.
            if key == "socket" {
                socket = Some(value);
            }
        }
        let transport = if unix {
            if !authority.is_empty() {
                return Err(format!(
                    "{text}: an nbd+unix URI has no host (nbd+unix:///EXPORT?socket=PATH)"
                ));
            }
            match socket {
                Some(s) if !s.is_empty() => Transport::Unix(PathBuf::from(s)),
                _ => return Err(format!("{text}: an nbd+unix URI needs ?socket=PATH")),
            }
        } else {
            if socket.is_some() {
                return Err(format!("{text}: ?socket= is for nbd+unix URIs"));
            }
            let (host, port) = host_port(authority).map_err(|e| format!("{text}: {e}"))?;
            Transport::Tcp { host, port }
        };
        Ok(Address {
            transport,
            export,
            uri: text.to_owned(),
        })
    }
}

/// `host[:port]`, `[v6]`, `[v6]:port`; an empty host is `localhost` (doc/uri.md).
fn host_port(authority: &str) -> Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("an NBD URI has no user information".to_owned());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| "unclosed [ in the host".to_owned())?;
        match after {
            "" => (host, None),
            p => match p.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(format!("unexpected {after:?} after the host")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err("an IPv6 host must be in brackets: nbd://[::1]:10809/EXPORT".to_owned())
            }
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("bad port {p:?}"))?,
    };
    let host = if host.is_empty() { "localhost" } else { host };
    Ok((host.to_owned(), port))
}

/// Percent-decoding (RFC 3986) to UTF-8.
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).map_err(|_| "not UTF-8 once decoded".to_owned())?;
    if s.contains('\0') {
        return Err("contains NUL".to_owned());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Transport {
        Transport::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn tcp_uris_take_a_host_a_port_and_an_export() {
        let a = Address::parse("nbd://example.org:10810/disk0").expect("valid");
        assert_eq!(
            (a.transport.clone(), a.export.as_str()),
            (tcp("example.org", 10810), "disk0")
        );
        assert_eq!(a.to_string(), "nbd://example.org:10810/disk0");
        let a = Address::parse("nbd://127.0.0.1/").expect("valid");
        assert_eq!(
            (a.transport, a.export.as_str()),
            (tcp("127.0.0.1", DEFAULT_PORT), "")
        );
        let a = Address::parse("nbd+tcp://[::1]:9000/a%20b/c").expect("valid");
        assert_eq!(
            (a.transport, a.export.as_str()),
            (tcp("::1", 9000), "a b/c")
        );
        let a = Address::parse("nbd://").expect("valid");
        assert_eq!(
            (a.transport, a.export.as_str()),
            (tcp("localhost", DEFAULT_PORT), "")
        );
        let a = Address::parse("nbd://[fe80::1]/x?tls-certificates=/etc")
            .expect("unknown queries are ignored");
        assert_eq!(a.transport, tcp("fe80::1", DEFAULT_PORT));
    }

    #[test]
    fn unix_uris_need_a_socket_and_no_host() {
        let a = Address::parse("nbd+unix:///vda?socket=/run/backup%2D1.sock").expect("valid");
        assert_eq!(a.transport, Transport::Unix("/run/backup-1.sock".into()));
        assert_eq!(a.export, "vda");
        let a = Address::parse("nbd+unix://?socket=/s").expect("empty export");
        assert_eq!(a.export, "");
        for bad in [
            "nbd+unix:///vda",
            "nbd+unix:///vda?socket=",
            "nbd+unix://host/vda?socket=/s",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_uris_are_refused_in_one_line() {
        for bad in [
            "/dev/sda",
            "http://x/y",
            "nbds://x/y",
            "nbd://x:0/y",
            "nbd://x:99999/y",
            "nbd://x:abc/y",
            "nbd://::1/y",
            "nbd://[::1/y",
            "nbd://u@x/y",
            "nbd://x/y%zz",
            "nbd://x/y%00",
            "nbd://x/y%ff",
            "nbd://x/y#frag",
            "nbd://x/y?socket=/s",
        ] {
            let e = Address::parse(bad).expect_err(bad);
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(Address::is_nbd_uri("nbd+unix:///x?socket=/s"));
        assert!(Address::is_nbd_uri("nbds://x/"));
        assert!(!Address::is_nbd_uri("./nbd://x"));
        assert!(!Address::is_nbd_uri("/dev/nbd0"));
    }
}
