//! Account management: the one implementation behind `berth user`,
//! `berth project`, `berth robot` and the `/api/v1/` admin API. Every
//! change is validated here and recorded in the audit log by the caller.

use metadata::{IdentityStore, Project, Robot, RobotGrant, Role, User};
use serde::Serialize;

use crate::policy::Action;
use crate::{now, password};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Backend(String),
}

fn backend(e: impl std::fmt::Display) -> AdminError {
    AdminError::Backend(e.to_string())
}

pub type Result<T> = std::result::Result<T, AdminError>;

pub const MIN_PASSWORD_LEN: usize = 8;

/// Account names: lowercase alphanumerics and `._-`, 1 to 64 characters,
/// starting with an alphanumeric.
fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AdminError::Invalid(format!(
            "invalid {kind} name {name:?}: use 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )))
    }
}

/// A project is the first component of repository names, so it must be one.
fn check_project_name(name: &str) -> Result<()> {
    if !name.contains('/') && name.parse::<oci::RepoName>().is_ok() {
        Ok(())
    } else {
        Err(AdminError::Invalid(format!(
            "invalid project name {name:?}: it must be a single repository path component, e.g. 'team'"
        )))
    }
}

fn check_password(pw: &str) -> Result<()> {
    if pw.chars().count() < MIN_PASSWORD_LEN {
        return Err(AdminError::Invalid(format!(
            "password too short: use at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UserView {
    pub name: String,
    pub system_admin: bool,
    pub created: u64,
}

pub async fn create_user(store: &dyn IdentityStore, name: &str, pw: &str, system_admin: bool) -> Result<UserView> {
    check_name("user", name)?;
    check_password(pw)?;
    if store.get_user(name).await.map_err(backend)?.is_some() {
        return Err(AdminError::Conflict(format!("user {name:?} already exists")));
    }
    let user = User {
        name: name.to_string(),
        password_hash: password::hash(pw).map_err(backend)?,
        system_admin,
        created: now(),
        // Not 0: a token of an earlier account of this name stays void.
        generation: next_generation(0),
    };
    store.put_user(&user).await.map_err(backend)?;
    Ok(view_user(user))
}

fn view_user(u: User) -> UserView {
    UserView {
        name: u.name,
        system_admin: u.system_admin,
        created: u.created,
    }
}

pub async fn set_password(store: &dyn IdentityStore, name: &str, pw: &str) -> Result<()> {
    check_password(pw)?;
    let hash = password::hash(pw).map_err(backend)?;
    let change = Box::new(move |u: &mut User| {
        u.password_hash = hash;
        u.generation = next_generation(u.generation);
    });
    if store.update_user(name, change).await.map_err(backend)? {
        Ok(())
    } else {
        Err(AdminError::NotFound(format!("no user {name:?}")))
    }
}

/// A generation after `old` and after any handed out before (it follows
/// the clock in microseconds), so that a user deleted and created again
/// does not revive the old account's tokens.
fn next_generation(old: u64) -> u64 {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    micros.max(old + 1)
}

pub async fn delete_user(store: &dyn IdentityStore, name: &str) -> Result<()> {
    if store.delete_user(name).await.map_err(backend)? {
        Ok(())
    } else {
        Err(AdminError::NotFound(format!("no user {name:?}")))
    }
}

pub async fn list_users(store: &dyn IdentityStore) -> Result<Vec<UserView>> {
    Ok(store
        .list_users()
        .await
        .map_err(backend)?
        .into_iter()
        .map(view_user)
        .collect())
}

pub async fn create_project(store: &dyn IdentityStore, name: &str, public: bool) -> Result<Project> {
    check_project_name(name)?;
    if store.get_project(name).await.map_err(backend)?.is_some() {
        return Err(AdminError::Conflict(format!("project {name:?} already exists")));
    }
    let p = Project {
        name: name.to_string(),
        public,
        created: now(),
    };
    store.put_project(&p).await.map_err(backend)?;
    Ok(p)
}

pub async fn get_project(store: &dyn IdentityStore, name: &str) -> Result<Project> {
    store.get_project(name).await.map_err(backend)?.ok_or_else(|| {
        AdminError::NotFound(format!(
            "no project {name:?}; create it with: berth project create {name}"
        ))
    })
}

pub async fn set_public(store: &dyn IdentityStore, name: &str, public: bool) -> Result<Project> {
    let mut p = get_project(store, name).await?;
    p.public = public;
    store.put_project(&p).await.map_err(backend)?;
    Ok(p)
}

pub async fn delete_project(store: &dyn IdentityStore, name: &str) -> Result<()> {
    if store.delete_project(name).await.map_err(backend)? {
        Ok(())
    } else {
        Err(AdminError::NotFound(format!("no project {name:?}")))
    }
}

pub async fn list_projects(store: &dyn IdentityStore) -> Result<Vec<Project>> {
    store.list_projects().await.map_err(backend)
}

/// Sets a member's role (`None` removes them). A demotion or removal ends
/// the user's tokens, whose grants were decided under the old role.
pub async fn set_member(store: &dyn IdentityStore, project: &str, user: &str, role: Option<Role>) -> Result<()> {
    get_project(store, project).await?;
    if role.is_some() && store.get_user(user).await.map_err(backend)?.is_none() {
        return Err(AdminError::NotFound(format!("no user {user:?}; create it first")));
    }
    let old = store.get_role(project, user).await.map_err(backend)?;
    store.set_member(project, user, role).await.map_err(backend)?;
    let demoted = match (old, role) {
        (Some(o), Some(n)) => n < o,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if demoted {
        let bump = Box::new(|u: &mut User| u.generation = next_generation(u.generation));
        store.update_user(user, bump).await.map_err(backend)?;
    }
    Ok(())
}

pub async fn list_members(store: &dyn IdentityStore, project: &str) -> Result<Vec<(String, Role)>> {
    get_project(store, project).await?;
    store.list_members(project).await.map_err(backend)
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RobotView {
    pub name: String,
    pub grants: Vec<RobotGrant>,
    pub expires_at: Option<u64>,
    pub revoked: bool,
    pub description: String,
    pub created: u64,
}

fn view_robot(r: Robot) -> RobotView {
    RobotView {
        name: r.name,
        grants: r.grants,
        expires_at: r.expires_at,
        revoked: r.revoked,
        description: r.description,
        created: r.created,
    }
}

/// Parses a grant like `team:pull,push`.
pub fn parse_grant(s: &str) -> Result<RobotGrant> {
    let (project, actions) = s.split_once(':').ok_or_else(|| {
        AdminError::Invalid(format!(
            "invalid grant {s:?}: use PROJECT:ACTION[,ACTION], e.g. team:pull,push"
        ))
    })?;
    check_project_name(project)?;
    let actions: Vec<String> = actions.split(',').map(|a| a.trim().to_string()).collect();
    if let Some(bad) = actions.iter().find(|a| Action::parse(a).is_none()) {
        return Err(AdminError::Invalid(format!(
            "unknown action {bad:?}: use pull, push or delete"
        )));
    }
    Ok(RobotGrant {
        project: project.to_string(),
        actions,
    })
}

/// Creates `robot$<name>`; returns it and its secret, shown only now.
pub async fn create_robot(
    store: &dyn IdentityStore,
    name: &str,
    grants: Vec<RobotGrant>,
    ttl_secs: Option<u64>,
    description: &str,
) -> Result<(RobotView, String)> {
    check_name("robot", name)?;
    if grants.is_empty() {
        return Err(AdminError::Invalid(
            "a robot needs at least one grant, e.g. team:pull".into(),
        ));
    }
    for g in &grants {
        get_project(store, &g.project).await?;
    }
    let full = format!("robot${name}");
    if store.get_robot(&full).await.map_err(backend)?.is_some() {
        return Err(AdminError::Conflict(format!("robot {full:?} already exists")));
    }
    let secret = password::random_secret().map_err(backend)?;
    let r = Robot {
        name: full,
        secret_hash: password::hash(&secret).map_err(backend)?,
        grants,
        expires_at: ttl_secs.map(|t| now() + t),
        revoked: false,
        description: description.to_string(),
        created: now(),
    };
    store.put_robot(&r).await.map_err(backend)?;
    Ok((view_robot(r), secret))
}

pub async fn revoke_robot(store: &dyn IdentityStore, name: &str) -> Result<()> {
    let full = if name.starts_with("robot$") {
        name.to_string()
    } else {
        format!("robot${name}")
    };
    let mut r = store
        .get_robot(&full)
        .await
        .map_err(backend)?
        .ok_or_else(|| AdminError::NotFound(format!("no robot {full:?}")))?;
    r.revoked = true;
    store.put_robot(&r).await.map_err(backend)
}

pub async fn list_robots(store: &dyn IdentityStore) -> Result<Vec<RobotView>> {
    Ok(store
        .list_robots()
        .await
        .map_err(backend)?
        .into_iter()
        .map(view_robot)
        .collect())
}

/// Parses a lifetime like `90d`, `12h` or `3600` (seconds) into seconds.
pub fn parse_duration(s: &str) -> Result<u64> {
    match observe::time::parse_duration(s) {
        Ok(d) if d.as_secs() > 0 => Ok(d.as_secs()),
        Ok(_) => Err(AdminError::Invalid(format!("lifetime {s:?} is shorter than a second"))),
        Err(e) => Err(AdminError::Invalid(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_grants_durations() {
        assert!(check_name("user", "alice").is_ok());
        assert!(check_name("user", "Alice").is_err());
        assert!(check_name("user", "../x").is_err());
        assert!(check_project_name("team").is_ok());
        assert!(check_project_name("team/app").is_err());
        let g = parse_grant("team:pull,push").unwrap();
        assert_eq!(g.actions, vec!["pull", "push"]);
        assert!(parse_grant("team:fly").is_err());
        assert!(parse_grant("team").is_err());
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_duration("45").unwrap(), 45);
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[tokio::test]
    async fn account_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let store = metadata::RedbMetadata::open(&dir.path().join("m.redb")).unwrap();
        create_user(&store, "alice", "longenough", false).await.unwrap();
        assert!(matches!(
            create_user(&store, "alice", "longenough", false).await,
            Err(AdminError::Conflict(_))
        ));
        assert!(matches!(
            create_user(&store, "bob", "short", false).await,
            Err(AdminError::Invalid(_))
        ));
        assert!(matches!(
            set_member(&store, "team", "alice", Some(Role::Guest)).await,
            Err(AdminError::NotFound(_))
        ));
        create_project(&store, "team", false).await.unwrap();
        set_member(&store, "team", "alice", Some(Role::Developer))
            .await
            .unwrap();
        assert!(matches!(
            set_member(&store, "team", "ghost", Some(Role::Guest)).await,
            Err(AdminError::NotFound(_))
        ));
        assert_eq!(
            list_members(&store, "team").await.unwrap(),
            vec![("alice".into(), Role::Developer)]
        );
        let (r, secret) = create_robot(&store, "ci", vec![parse_grant("team:pull").unwrap()], Some(3600), "")
            .await
            .unwrap();
        assert_eq!(r.name, "robot$ci");
        let stored = store.get_robot("robot$ci").await.unwrap().unwrap();
        assert!(password::verify(&secret, &stored.secret_hash));
        assert!(!stored.secret_hash.contains(&secret));
        revoke_robot(&store, "ci").await.unwrap();
        assert!(store.get_robot("robot$ci").await.unwrap().unwrap().revoked);
        assert!(
            create_robot(&store, "x", vec![parse_grant("nope:pull").unwrap()], None, "")
                .await
                .is_err()
        );
    }
}
