//! Who may do what: pure decisions from an identity, a project and a role.

use metadata::{Project, RobotGrant, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }

    /// The least role that may do this.
    pub fn min_role(self) -> Role {
        match self {
            Action::Pull => Role::Guest,
            Action::Push => Role::Developer,
            Action::Delete => Role::Maintainer,
        }
    }
}

/// The caller, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    /// `generation`: the account's, when it authenticated (see
    /// `metadata::User::generation`).
    User {
        name: String,
        system_admin: bool,
        generation: u64,
    },
    Robot {
        name: String,
        grants: Vec<RobotGrant>,
    },
}

impl Principal {
    pub fn name(&self) -> &str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::User { name, .. } | Principal::Robot { name, .. } => name,
        }
    }

    pub fn is_system_admin(&self) -> bool {
        matches!(self, Principal::User { system_admin: true, .. })
    }
}

/// Decides whether `who` may do `action` in `project` (named `project_name`,
/// `None` if it does not exist), given their `role` there. The error says
/// what is missing, for the client.
pub fn decide(
    who: &Principal,
    project_name: &str,
    project: Option<&Project>,
    role: Option<Role>,
    action: Action,
) -> Result<(), String> {
    if who.is_system_admin() {
        return Ok(());
    }
    if *who == Principal::Anonymous {
        return anonymous(project_name, project, action);
    }
    let Some(project) = project else {
        return Err(format!(
            "project {project_name:?} does not exist; an administrator must create it (berth project create {project_name})"
        ));
    };
    if action == Action::Pull && project.public {
        return Ok(());
    }
    match who {
        Principal::Anonymous => anonymous(project_name, Some(project), action),
        Principal::User { name, .. } => {
            let need = action.min_role();
            match role {
                Some(r) if r >= need => Ok(()),
                Some(r) => Err(format!(
                    "user {name:?} has role {} in project {project_name:?}; {} needs {} or higher",
                    r.as_str(),
                    action.as_str(),
                    need.as_str()
                )),
                None => Err(format!(
                    "user {name:?} is not a member of project {project_name:?}; {} needs role {} or higher",
                    action.as_str(),
                    need.as_str()
                )),
            }
        }
        Principal::Robot { name, grants } => {
            let granted = grants
                .iter()
                .any(|g| g.project == project_name && g.actions.iter().any(|a| a == action.as_str()));
            if granted {
                Ok(())
            } else {
                Err(format!(
                    "robot {name:?} has no {} permission in project {project_name:?}",
                    action.as_str()
                ))
            }
        }
    }
}

/// What the anonymous may do. They learn nothing about what exists: a
/// missing project and a private one get the same answer.
fn anonymous(project_name: &str, project: Option<&Project>, action: Action) -> Result<(), String> {
    match project {
        Some(p) if p.public && action == Action::Pull => Ok(()),
        Some(p) if p.public => Err(format!(
            "{} needs a login: authenticate (e.g. docker login) to {} in project {project_name:?}",
            action.as_str(),
            action.as_str()
        )),
        _ => Err(format!(
            "project {project_name:?} is private or does not exist: log in to {} it",
            action.as_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(public: bool) -> Project {
        Project {
            name: "team".into(),
            public,
            created: 0,
        }
    }

    fn user(name: &str) -> Principal {
        Principal::User {
            name: name.into(),
            system_admin: false,
            generation: 0,
        }
    }

    #[test]
    fn roles() {
        let p = project(false);
        let d = |r: Option<Role>, a| decide(&user("u"), "team", Some(&p), r, a);
        assert!(d(Some(Role::Guest), Action::Pull).is_ok());
        assert!(d(Some(Role::Guest), Action::Push)
            .unwrap_err()
            .contains("has role guest"));
        assert!(d(Some(Role::Developer), Action::Push).is_ok());
        assert!(d(Some(Role::Developer), Action::Delete)
            .unwrap_err()
            .contains("needs maintainer"));
        assert!(d(Some(Role::Maintainer), Action::Delete).is_ok());
        assert!(d(Some(Role::Admin), Action::Delete).is_ok());
        assert!(d(None, Action::Pull).unwrap_err().contains("not a member"));
    }

    #[test]
    fn public_anonymous_admin_and_robots() {
        let anon = Principal::Anonymous;
        assert!(decide(&anon, "team", Some(&project(true)), None, Action::Pull).is_ok());
        assert!(decide(&anon, "team", Some(&project(true)), None, Action::Push).is_err());
        let private = decide(&anon, "team", Some(&project(false)), None, Action::Pull).unwrap_err();
        let missing = decide(&anon, "team", None, None, Action::Pull).unwrap_err();
        assert_eq!(private, missing, "the anonymous cannot tell private from missing");
        assert!(decide(&anon, "team", Some(&project(true)), None, Action::Push)
            .unwrap_err()
            .contains("push needs a login"));
        let root = Principal::User {
            name: "root".into(),
            system_admin: true,
            generation: 0,
        };
        assert!(decide(&root, "new", None, None, Action::Delete).is_ok());
        assert!(decide(&user("u"), "new", None, None, Action::Pull)
            .unwrap_err()
            .contains("does not exist"));
        let robot = Principal::Robot {
            name: "robot$ci".into(),
            grants: vec![RobotGrant {
                project: "team".into(),
                actions: vec!["pull".into(), "push".into()],
            }],
        };
        assert!(decide(&robot, "team", Some(&project(false)), None, Action::Push).is_ok());
        assert!(decide(&robot, "team", Some(&project(false)), None, Action::Delete).is_err());
        assert!(decide(&robot, "other", Some(&project(false)), None, Action::Pull).is_err());
    }
}
