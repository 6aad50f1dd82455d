//! `WWW-Authenticate` challenges (RFC 7235 syntax, as the Docker token spec
//! uses it): `Bearer realm="...",service="...",scope="..."`, `Basic
//! realm="..."`, possibly several in one header. The header comes from the
//! network: any input is accepted, never a panic, and a malformed header
//! (an unterminated quoted string) yields no challenge at all.

/// One challenge: its scheme and parameters (names lowercased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }
}

/// Every challenge in the header, in order.
pub fn parse(header: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    let mut rest = header.trim_start_matches([',', ' ', '\t']);
    while !rest.is_empty() {
        let (scheme, after) = token(rest);
        if scheme.is_empty() {
            return Vec::new();
        }
        let Some((params, after)) = auth_params(after) else {
            return Vec::new();
        };
        out.push(Challenge {
            scheme: scheme.to_string(),
            params,
        });
        rest = after.trim_start_matches([',', ' ', '\t']);
    }
    out
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn token(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !is_tchar(c)).unwrap_or(s.len());
    s.split_at(end)
}

type Params<'a> = (Vec<(String, String)>, &'a str);

/// `name=value` pairs (value a token or a quoted string) separated by
/// commas, up to the next scheme; `None` on an unterminated quote.
fn auth_params(mut s: &str) -> Option<Params<'_>> {
    let mut out = Vec::new();
    loop {
        let trimmed = s.trim_start_matches([',', ' ', '\t']);
        let (name, after) = token(trimmed);
        let after_ws = after.trim_start_matches([' ', '\t']);
        if name.is_empty() || !after_ws.starts_with('=') {
            // Not a parameter: the next challenge starts here.
            return Some((out, trimmed));
        }
        let value_start = after_ws[1..].trim_start_matches([' ', '\t']);
        let (value, rest) = match value_start.strip_prefix('"') {
            Some(q) => quoted(q)?,
            None => {
                let (v, r) = token(value_start);
                (v.to_string(), r)
            }
        };
        out.push((name.to_ascii_lowercase(), value));
        s = rest;
    }
}

/// The contents of a quoted string (after its opening quote) and the rest.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => out.extend(chars.next().map(|(_, c)| c)),
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_bearer() {
        let c = parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert!(c[0].is("bearer"));
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/nginx:pull,push"));
    }

    #[test]
    fn basic_quoting_and_several_challenges() {
        let c = parse(r#"Basic realm="a \"quoted\" realm", charset=UTF-8"#);
        assert_eq!(c[0].param("realm"), Some(r#"a "quoted" realm"#));
        assert_eq!(c[0].param("charset"), Some("UTF-8"));
        assert_eq!(parse("Basic")[0].params, vec![]);
        let c = parse(r#"Basic realm="x", Bearer realm="http://h/token", service=reg"#);
        assert_eq!(c.len(), 2);
        assert!(c[1].is("Bearer") && c[1].param("service") == Some("reg"));
        assert!(parse("Bearer realm=\"unterminated").is_empty());
        assert!(parse("").is_empty());
        assert!(parse("=x").is_empty());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            for c in parse(&s) {
                proptest::prop_assert!(!c.scheme.is_empty());
            }
        }
    }
}
