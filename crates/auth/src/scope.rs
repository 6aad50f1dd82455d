//! Token scopes, as in the Docker registry token spec:
//! `repository:<name>:<action>[,<action>...]` and `registry:catalog:*`.

use serde::{Deserialize, Serialize};

/// One entry of a token's `access` claim (and of a requested scope).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Access {
    pub fn allows(&self, kind: &str, name: &str, action: &str) -> bool {
        self.kind == kind && self.name == name && self.actions.iter().any(|a| a == action || a == "*")
    }

    /// The scope string of this access, for a challenge.
    pub fn to_scope(&self) -> String {
        format!("{}:{}:{}", self.kind, self.name, self.actions.join(","))
    }
}

/// Parses one scope. The name is what lies between the first and the last
/// ':' (names cannot contain ':'); a resource class such as
/// `repository(plugin)` is reduced to its type. Malformed scopes are `None`
/// and are ignored, as the spec's token servers do.
pub fn parse(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let kind = kind.split('(').next().unwrap_or(kind);
    if kind.is_empty() || name.is_empty() || name.len() > 512 {
        return None;
    }
    let actions: Vec<String> = actions
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    if actions.is_empty() {
        return None;
    }
    Some(Access {
        kind: kind.to_string(),
        name: name.to_string(),
        actions,
    })
}

/// Parses every scope of a request: each `scope` parameter may itself hold
/// several, separated by spaces.
pub fn parse_all<'a>(params: impl Iterator<Item = &'a str>) -> Vec<Access> {
    params.flat_map(|p| p.split(' ')).filter_map(parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let a = parse("repository:team/app:pull,push").unwrap();
        assert_eq!(a.kind, "repository");
        assert_eq!(a.name, "team/app");
        assert_eq!(a.actions, vec!["pull", "push"]);
        assert!(a.allows("repository", "team/app", "push"));
        assert!(!a.allows("repository", "team/app", "delete"));
        assert_eq!(parse("registry:catalog:*").unwrap().actions, vec!["*"]);
        assert_eq!(parse("repository(plugin):x:pull").unwrap().kind, "repository");
        assert!(parse("repository:x:").is_none());
        assert!(parse("repository").is_none());
        assert!(parse("::pull").is_none());
        let all = parse_all(["repository:a:pull repository:b:push", "bad"].into_iter());
        assert_eq!(all.len(), 2);
    }
}
