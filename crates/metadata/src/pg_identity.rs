//! `IdentityStore` on PostgreSQL: one table per kind, records as JSON (as
//! in `redb_identity`), memberships as rows.

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::identity::{IdentityStore, Project, Robot, Role, User, UserChange};
use crate::pg_store::{be, in_tx, q1, x, PostgresMetadata};
use crate::Result;

/// The record tables; names are not user input.
#[derive(Clone, Copy)]
enum Kind {
    Users,
    Projects,
    Robots,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::Users => "users",
            Kind::Projects => "projects",
            Kind::Robots => "robots",
        }
    }
}

impl PostgresMetadata {
    async fn put_json<T: Serialize>(&self, kind: Kind, key: &str, v: &T) -> Result<()> {
        let json = serde_json::to_vec(v).map_err(be)?;
        let sql = format!(
            "INSERT INTO {} (name, record) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record",
            kind.table()
        );
        self.rows(&sql, &[&key, &json]).await.map(|_| ())
    }

    async fn get_json<T: DeserializeOwned>(&self, kind: Kind, key: &str) -> Result<Option<T>> {
        let sql = format!("SELECT record FROM {} WHERE name = $1", kind.table());
        self.row(&sql, &[&key])
            .await?
            .map(|r| serde_json::from_slice(r.get::<_, &[u8]>(0)).map_err(be))
            .transpose()
    }

    async fn list_json<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<T>> {
        let sql = format!("SELECT record FROM {} ORDER BY name", kind.table());
        self.rows(&sql, &[])
            .await?
            .iter()
            .map(|r| serde_json::from_slice(r.get::<_, &[u8]>(0)).map_err(be))
            .collect()
    }

    /// Removes `key` and its memberships (by `column`) in one transaction.
    async fn delete_with_members(&self, kind: Kind, key: &str, column: &str) -> Result<bool> {
        let del = format!("DELETE FROM {} WHERE name = $1", kind.table());
        let members = format!("DELETE FROM members WHERE {column} = $1");
        in_tx!(self, |tx| {
            let n = x(tx, &del, &[&key]).await?;
            x(tx, &members, &[&key]).await?;
            n > 0
        })
    }
}

#[async_trait]
impl IdentityStore for PostgresMetadata {
    async fn put_user(&self, user: &User) -> Result<()> {
        self.put_json(Kind::Users, &user.name, user).await
    }

    async fn get_user(&self, name: &str) -> Result<Option<User>> {
        self.get_json(Kind::Users, name).await
    }

    async fn update_user(&self, name: &str, change: UserChange) -> Result<bool> {
        // The change runs once, on the row read under its lock; a retry of
        // the transaction (after a deadlock) cannot run it again.
        let mut change = Some(change);
        in_tx!(self, |tx| {
            let Some(row) = q1(tx, "SELECT record FROM users WHERE name = $1 FOR UPDATE", &[&name]).await? else {
                return Ok(false);
            };
            let mut user: User = serde_json::from_slice(row.get::<_, &[u8]>(0)).map_err(be)?;
            let Some(f) = change.take() else {
                return Err(be(std::io::Error::other("the user change was already applied")).into());
            };
            f(&mut user);
            let json = serde_json::to_vec(&user).map_err(be)?;
            x(tx, "UPDATE users SET record = $2 WHERE name = $1", &[&name, &json]).await?;
            true
        })
    }

    async fn delete_user(&self, name: &str) -> Result<bool> {
        self.delete_with_members(Kind::Users, name, "member").await
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        self.list_json(Kind::Users).await
    }

    async fn put_project(&self, project: &Project) -> Result<()> {
        self.put_json(Kind::Projects, &project.name, project).await
    }

    async fn get_project(&self, name: &str) -> Result<Option<Project>> {
        self.get_json(Kind::Projects, name).await
    }

    async fn delete_project(&self, name: &str) -> Result<bool> {
        self.delete_with_members(Kind::Projects, name, "project").await
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        self.list_json(Kind::Projects).await
    }

    async fn set_member(&self, project: &str, user: &str, role: Option<Role>) -> Result<()> {
        match role {
            Some(r) => {
                self.rows(
                    "INSERT INTO members (project, member, role) VALUES ($1, $2, $3) \
                     ON CONFLICT (project, member) DO UPDATE SET role = EXCLUDED.role",
                    &[&project, &user, &r.as_str()],
                )
                .await?
            }
            None => {
                self.rows(
                    "DELETE FROM members WHERE project = $1 AND member = $2",
                    &[&project, &user],
                )
                .await?
            }
        };
        Ok(())
    }

    async fn get_role(&self, project: &str, user: &str) -> Result<Option<Role>> {
        let row = self
            .row(
                "SELECT role FROM members WHERE project = $1 AND member = $2",
                &[&project, &user],
            )
            .await?;
        Ok(row.and_then(|r| Role::parse(r.get(0))))
    }

    async fn list_members(&self, project: &str) -> Result<Vec<(String, Role)>> {
        let rows = self
            .rows(
                "SELECT member, role FROM members WHERE project = $1 ORDER BY member",
                &[&project],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Role::parse(r.get(1)).map(|role| (r.get(0), role)))
            .collect())
    }

    async fn put_robot(&self, robot: &Robot) -> Result<()> {
        self.put_json(Kind::Robots, &robot.name, robot).await
    }

    async fn get_robot(&self, name: &str) -> Result<Option<Robot>> {
        self.get_json(Kind::Robots, name).await
    }

    async fn list_robots(&self) -> Result<Vec<Robot>> {
        self.list_json(Kind::Robots).await
    }
}
