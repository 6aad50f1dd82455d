//! `WWW-Authenticate` challenges of an upstream registry (RFC 7235 syntax,
//! as the Docker token spec uses it): `Bearer realm="...",service="...",
//! scope="..."` or `Basic realm="..."`. The header comes from the network,
//! so the parser takes any bytes and never panics.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// Fetch a token from `realm` with these parameters (`service`,
    /// `scope`).
    Bearer {
        realm: String,
        params: BTreeMap<String, String>,
    },
    /// Send the credentials with Basic.
    Basic,
}

/// The first challenge berth can answer, Bearer preferred.
pub fn parse(header: &str) -> Option<Challenge> {
    let mut basic = false;
    let mut rest = header.trim_start();
    while !rest.is_empty() {
        let (scheme, after) = token(rest);
        if scheme.is_empty() {
            return None;
        }
        let (params, after) = auth_params(after);
        if scheme.eq_ignore_ascii_case("bearer") {
            let mut params = params;
            let realm = params.remove("realm")?;
            if !(realm.starts_with("https://") || realm.starts_with("http://")) {
                return None;
            }
            return Some(Challenge::Bearer { realm, params });
        }
        basic |= scheme.eq_ignore_ascii_case("basic");
        rest = after.trim_start_matches([',', ' ', '\t']);
    }
    basic.then_some(Challenge::Basic)
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn token(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !is_tchar(c)).unwrap_or(s.len());
    s.split_at(end)
}

/// `name=value` pairs (value a token or a quoted string) separated by
/// commas, up to the next scheme. Names are lowercased.
fn auth_params(mut s: &str) -> (BTreeMap<String, String>, &str) {
    let mut out = BTreeMap::new();
    loop {
        let trimmed = s.trim_start_matches([',', ' ', '\t']);
        let (name, after) = token(trimmed);
        let after_ws = after.trim_start_matches([' ', '\t']);
        if name.is_empty() || !after_ws.starts_with('=') {
            // Not a parameter: the next challenge starts here.
            return (out, trimmed);
        }
        let value_start = after_ws[1..].trim_start_matches([' ', '\t']);
        let (value, rest) = if let Some(q) = value_start.strip_prefix('"') {
            quoted(q)
        } else {
            let (v, r) = token(value_start);
            (v.to_string(), r)
        };
        out.insert(name.to_ascii_lowercase(), value);
        s = rest;
        if s.is_empty() {
            return (out, s);
        }
    }
}

/// The contents of a quoted string (after its opening quote) and the rest.
fn quoted(s: &str) -> (String, &str) {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (out, &s[i + 1..]),
            '\\' => {
                if let Some((_, n)) = chars.next() {
                    out.push(n);
                }
            }
            c => out.push(c),
        }
    }
    (out, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_bearer() {
        let c = parse(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#)
            .unwrap();
        let Challenge::Bearer { realm, params } = c else {
            panic!("not bearer")
        };
        assert_eq!(realm, "https://auth.docker.io/token");
        assert_eq!(params["service"], "registry.docker.io");
        assert_eq!(params["scope"], "repository:library/nginx:pull");
    }

    #[test]
    fn basic_and_several_challenges() {
        assert_eq!(parse(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        let c = parse(r#"Basic realm="x", Bearer realm="http://h/token", service=reg"#).unwrap();
        assert!(matches!(c, Challenge::Bearer { ref params, .. } if params["service"] == "reg"));
        assert_eq!(parse(r#"Bearer realm="a \"q\"""#), None, "a realm must be a URL");
        assert_eq!(parse("Negotiate"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("Bearer service=x"), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = parse(&s);
        }
    }
}
