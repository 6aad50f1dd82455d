//! `IdentityStore` on redb: one table per kind, values as JSON.

use async_trait::async_trait;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::identity::{IdentityStore, Project, Robot, Role, User, UserChange};
use crate::redb_store::{be, RedbMetadata};
use crate::Result;

const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const PROJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("projects");
/// (project, user) -> role name.
const MEMBERS: TableDefinition<(&str, &str), &str> = TableDefinition::new("members");
const ROBOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("robots");

pub(crate) fn create_tables(w: &WriteTransaction) -> Result<()> {
    w.open_table(USERS).map_err(be)?;
    w.open_table(PROJECTS).map_err(be)?;
    w.open_table(MEMBERS).map_err(be)?;
    w.open_table(ROBOTS).map_err(be)?;
    Ok(())
}

impl RedbMetadata {
    async fn put_json<T: Serialize>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: &str,
        v: &T,
    ) -> Result<()> {
        let (key, json) = (key.to_string(), serde_json::to_vec(v).map_err(be)?);
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            w.open_table(table)
                .map_err(be)?
                .insert(key.as_str(), json.as_slice())
                .map_err(be)?;
            w.commit().map_err(be)
        })
        .await
    }

    async fn get_json<T: DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: &str,
    ) -> Result<Option<T>> {
        let key = key.to_string();
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(table).map_err(be)?;
            match t.get(key.as_str()).map_err(be)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(be)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_json<T: DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
    ) -> Result<Vec<T>> {
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(table).map_err(be)?;
            let mut out = Vec::new();
            for item in t.iter().map_err(be)? {
                out.push(serde_json::from_slice(item.map_err(be)?.1.value()).map_err(be)?);
            }
            Ok(out)
        })
        .await
    }

    /// Removes `key` from `table` and every membership whose `member_side`
    /// (0 = project, 1 = user) equals it, in one transaction.
    async fn delete_with_members(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: &str,
        member_side: usize,
    ) -> Result<bool> {
        let key = key.to_string();
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            let existed;
            {
                existed = w
                    .open_table(table)
                    .map_err(be)?
                    .remove(key.as_str())
                    .map_err(be)?
                    .is_some();
                let mut members = w.open_table(MEMBERS).map_err(be)?;
                let mut doomed = Vec::new();
                for item in members.iter().map_err(be)? {
                    let (k, _) = item.map_err(be)?;
                    let (p, u) = k.value();
                    if [p, u][member_side] == key {
                        doomed.push((p.to_string(), u.to_string()));
                    }
                }
                for (p, u) in doomed {
                    members.remove((p.as_str(), u.as_str())).map_err(be)?;
                }
            }
            w.commit().map_err(be)?;
            Ok(existed)
        })
        .await
    }
}

#[async_trait]
impl IdentityStore for RedbMetadata {
    async fn put_user(&self, user: &User) -> Result<()> {
        self.put_json(USERS, &user.name, user).await
    }

    async fn get_user(&self, name: &str) -> Result<Option<User>> {
        self.get_json(USERS, name).await
    }

    async fn update_user(&self, name: &str, change: UserChange) -> Result<bool> {
        let name = name.to_string();
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            {
                let mut t = w.open_table(USERS).map_err(be)?;
                let current = t.get(name.as_str()).map_err(be)?.map(|v| v.value().to_vec());
                let Some(json) = current else { return Ok(false) };
                let mut user: User = serde_json::from_slice(&json).map_err(be)?;
                change(&mut user);
                let json = serde_json::to_vec(&user).map_err(be)?;
                t.insert(name.as_str(), json.as_slice()).map_err(be)?;
            }
            w.commit().map_err(be)?;
            Ok(true)
        })
        .await
    }

    async fn delete_user(&self, name: &str) -> Result<bool> {
        self.delete_with_members(USERS, name, 1).await
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        self.list_json(USERS).await
    }

    async fn put_project(&self, project: &Project) -> Result<()> {
        self.put_json(PROJECTS, &project.name, project).await
    }

    async fn get_project(&self, name: &str) -> Result<Option<Project>> {
        self.get_json(PROJECTS, name).await
    }

    async fn delete_project(&self, name: &str) -> Result<bool> {
        self.delete_with_members(PROJECTS, name, 0).await
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        self.list_json(PROJECTS).await
    }

    async fn set_member(&self, project: &str, user: &str, role: Option<Role>) -> Result<()> {
        let (project, user) = (project.to_string(), user.to_string());
        self.run(move |db| {
            let w = db.begin_write().map_err(be)?;
            {
                let mut t = w.open_table(MEMBERS).map_err(be)?;
                match role {
                    Some(r) => {
                        t.insert((project.as_str(), user.as_str()), r.as_str()).map_err(be)?;
                    }
                    None => {
                        t.remove((project.as_str(), user.as_str())).map_err(be)?;
                    }
                }
            }
            w.commit().map_err(be)
        })
        .await
    }

    async fn get_role(&self, project: &str, user: &str) -> Result<Option<Role>> {
        let (project, user) = (project.to_string(), user.to_string());
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(MEMBERS).map_err(be)?;
            Ok(t.get((project.as_str(), user.as_str()))
                .map_err(be)?
                .and_then(|v| Role::parse(v.value())))
        })
        .await
    }

    async fn list_members(&self, project: &str) -> Result<Vec<(String, Role)>> {
        let project = project.to_string();
        self.run(move |db| {
            let r = db.begin_read().map_err(be)?;
            let t = r.open_table(MEMBERS).map_err(be)?;
            let mut out = Vec::new();
            for item in t.range((project.as_str(), "")..).map_err(be)? {
                let (k, v) = item.map_err(be)?;
                let (p, u) = k.value();
                if p != project {
                    break;
                }
                if let Some(role) = Role::parse(v.value()) {
                    out.push((u.to_string(), role));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_robot(&self, robot: &Robot) -> Result<()> {
        self.put_json(ROBOTS, &robot.name, robot).await
    }

    async fn get_robot(&self, name: &str) -> Result<Option<Robot>> {
        self.get_json(ROBOTS, name).await
    }

    async fn list_robots(&self) -> Result<Vec<Robot>> {
        self.list_json(ROBOTS).await
    }
}
