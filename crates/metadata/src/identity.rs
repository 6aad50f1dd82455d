//! Identity state: users, projects, memberships and robot accounts. A second
//! trait beside `MetadataStore`, served by the same backends, so access
//! control lives in the same transactional store as the registry's data.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Result;

/// A member's role in a project; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Pull.
    Guest,
    /// Pull and push.
    Developer,
    /// Pull, push, delete and tag.
    Maintainer,
    /// Everything, including managing members.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Guest => "guest",
            Role::Developer => "developer",
            Role::Maintainer => "maintainer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "guest" => Some(Role::Guest),
            "developer" => Some(Role::Developer),
            "maintainer" => Some(Role::Maintainer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    /// An argon2id PHC string; never the password.
    pub password_hash: String,
    /// A system administrator may do everything everywhere.
    #[serde(default)]
    pub system_admin: bool,
    pub created: u64,
    /// Changes whenever the account's credentials or standing change
    /// (password, demotion, re-creation under the same name); tokens carry
    /// the value they were issued under and die when it no longer matches.
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub name: String,
    /// Anyone, even anonymous, may pull from a public project.
    #[serde(default)]
    pub public: bool,
    pub created: u64,
}

/// What a robot may do in one project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotGrant {
    pub project: String,
    /// A subset of "pull", "push", "delete".
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Robot {
    /// The full account name, `robot$<name>`.
    pub name: String,
    pub secret_hash: String,
    pub grants: Vec<RobotGrant>,
    /// Seconds since the Unix epoch; `None` never expires.
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default)]
    pub description: String,
    pub created: u64,
}

/// An edit of a user record, applied inside the store's transaction.
pub type UserChange = Box<dyn FnOnce(&mut User) + Send + 'static>;

#[async_trait]
pub trait IdentityStore: Send + Sync + 'static {
    /// Creates or replaces a user.
    async fn put_user(&self, user: &User) -> Result<()>;
    async fn get_user(&self, name: &str) -> Result<Option<User>>;
    /// Changes a user in one transaction (no lost update against a
    /// concurrent change). Returns whether the user existed.
    async fn update_user(&self, name: &str, change: UserChange) -> Result<bool>;
    /// Deletes a user and their memberships. Returns whether they existed.
    async fn delete_user(&self, name: &str) -> Result<bool>;
    async fn list_users(&self) -> Result<Vec<User>>;

    async fn put_project(&self, project: &Project) -> Result<()>;
    async fn get_project(&self, name: &str) -> Result<Option<Project>>;
    /// Deletes a project and its memberships. Returns whether it existed.
    async fn delete_project(&self, name: &str) -> Result<bool>;
    async fn list_projects(&self) -> Result<Vec<Project>>;

    /// Sets (`Some`) or removes (`None`) a user's role in a project.
    async fn set_member(&self, project: &str, user: &str, role: Option<Role>) -> Result<()>;
    async fn get_role(&self, project: &str, user: &str) -> Result<Option<Role>>;
    async fn list_members(&self, project: &str) -> Result<Vec<(String, Role)>>;

    /// Creates or replaces a robot account.
    async fn put_robot(&self, robot: &Robot) -> Result<()>;
    async fn get_robot(&self, name: &str) -> Result<Option<Robot>>;
    async fn list_robots(&self) -> Result<Vec<Robot>>;
}
