//! `berth user`, `berth project`, `berth robot` and `berth audit`: account
//! management on a data directory, through the same functions as the
//! `/api/v1/` admin API. They open the database directly, so they run while
//! berth is stopped (first setup, recovery); with berth running, use the
//! admin API.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use crate::backends::{MetadataLocation, MetadataStores};
use auth::admin;
use auth::audit::{self, AuditQuery};
use clap::{Args, Subcommand};
use metadata::Role;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Args, Debug)]
pub struct Store {
    /// The data directory of the registry. [default: as for `berth serve`]
    #[arg(long, env = "BERTH_DATA_DIR", value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Where the metadata lives: `redb` (in the data directory) or a
    /// PostgreSQL URL, as for `berth serve`. [default: redb]
    #[arg(long, env = "BERTH_METADATA", value_name = "URL", global = true)]
    pub metadata: Option<String>,
}

impl Store {
    fn dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(crate::config::default_data_dir)
    }

    pub fn location(&self) -> Result<MetadataLocation, BoxError> {
        Ok(self.metadata.as_deref().unwrap_or("").parse()?)
    }

    /// Opens the accounts on `rt` (whose tasks carry PostgreSQL's
    /// connections).
    fn open(&self, rt: &tokio::runtime::Runtime) -> Result<MetadataStores, BoxError> {
        let dir = self.dir();
        let location = self.location()?;
        let busy = ". While berth is running, manage accounts through its admin API, e.g. curl -u admin http://127.0.0.1:5000/api/v1/users";
        let stores = rt
            .block_on(crate::backends::open_stores(&dir, &location, None))
            .map_err(|e| {
                if location == MetadataLocation::Embedded {
                    format!("{e}{busy}")
                } else {
                    e
                }
            })?;
        Ok(stores)
    }

    /// Records an account change in the audit log of the data directory.
    fn audit(&self, action: &str, resource: &str, detail: &str) {
        let rec = audit::AuditRecord {
            time: observe::time::rfc3339(std::time::SystemTime::now()),
            actor: format!("cli:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into())),
            action: action.into(),
            resource: resource.into(),
            client: "local".into(),
            result: "ok".into(),
            detail: detail.into(),
        };
        let line = serde_json::to_string(&rec).unwrap_or_default();
        let path = self.dir().join("audit.log");
        let written = audit::open_append(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
        if let Err(e) = written {
            eprintln!("berth: warning: cannot write the audit log {}: {e}", path.display());
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Create a user. The password is read from stdin (or prompted for).
    Add {
        name: String,
        /// Make the user a system administrator.
        #[arg(long)]
        admin: bool,
    },
    /// Change a user's password (read from stdin).
    Passwd { name: String },
    /// Delete a user and their memberships.
    Delete { name: String },
    /// List users.
    List,
}

#[derive(Subcommand, Debug)]
pub enum ProjectCmd {
    /// Create a project (the first component of repository names).
    Create {
        name: String,
        /// Allow anonymous pulls.
        #[arg(long)]
        public: bool,
    },
    /// Make a project public (anonymous pull) or private.
    SetPublic { name: String, public: bool },
    /// Give a user a role in a project: guest, developer, maintainer, admin,
    /// or `none` to remove them.
    Member {
        project: String,
        user: String,
        role: String,
    },
    /// List a project's members.
    Members { project: String },
    /// Storage a project uses, as its quota counts it: each blob and manifest
    /// once, however many of its repositories share it.
    Usage { project: String },
    /// Delete a project's access rules (its repositories stay).
    Delete { name: String },
    /// List projects.
    List,
}

#[derive(Subcommand, Debug)]
pub enum RobotCmd {
    /// Create robot account `robot$NAME`; prints its secret once.
    Create {
        name: String,
        /// PROJECT:ACTIONS, e.g. team:pull,push; repeatable.
        #[arg(long = "grant", required = true)]
        grants: Vec<String>,
        /// Lifetime, e.g. 90d, 12h. [default: no expiry]
        #[arg(long)]
        expires: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Revoke a robot account at once.
    Revoke { name: String },
    /// List robot accounts.
    List,
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(flatten)]
    pub store: Store,
    /// Only this actor (user, robot$name, anonymous).
    #[arg(long)]
    pub actor: Option<String>,
    /// Only this action: push, pull, delete, login_failed, user_create, ...
    #[arg(long)]
    pub action: Option<String>,
    /// Only resources starting with this, e.g. a project `team/`.
    #[arg(long)]
    pub resource: Option<String>,
    /// Only this result: ok, denied, failed.
    #[arg(long)]
    pub result: Option<String>,
    /// Only records at or after this RFC 3339 time, e.g. 2026-11-27T00:00:00Z.
    #[arg(long)]
    pub since: Option<String>,
    /// Only the last N matching records.
    #[arg(long)]
    pub last: Option<usize>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn read_secret(prompt: &str) -> Result<String, BoxError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("{prompt}: ");
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    let pw = line.trim_end_matches(['\n', '\r']).to_string();
    if pw.is_empty() {
        return Err("no password given on stdin".into());
    }
    Ok(pw)
}

fn runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

pub fn user(store: Store, cmd: UserCmd) -> Result<(), BoxError> {
    let rt = runtime()?;
    let opened = store.open(&rt)?;
    let db = opened.identity.as_ref();
    rt.block_on(async {
        match cmd {
            UserCmd::Add { name, admin: sysadmin } => {
                let pw = read_secret(&format!("password for {name}"))?;
                admin::create_user(db, &name, &pw, sysadmin).await?;
                store.audit("user_create", &name, if sysadmin { "system admin" } else { "" });
                println!(
                    "created user {name}{}",
                    if sysadmin { " (system administrator)" } else { "" }
                );
            }
            UserCmd::Passwd { name } => {
                let pw = read_secret(&format!("new password for {name}"))?;
                admin::set_password(db, &name, &pw).await?;
                store.audit("user_password", &name, "");
                println!("password of {name} changed");
            }
            UserCmd::Delete { name } => {
                admin::delete_user(db, &name).await?;
                store.audit("user_delete", &name, "");
                println!("deleted user {name}");
            }
            UserCmd::List => {
                for u in admin::list_users(db).await? {
                    println!("{}{}", u.name, if u.system_admin { "\tsystem-admin" } else { "" });
                }
            }
        }
        Ok(())
    })
}

pub fn project(store: Store, cmd: ProjectCmd) -> Result<(), BoxError> {
    let rt = runtime()?;
    let opened = store.open(&rt)?;
    let db = opened.identity.as_ref();
    rt.block_on(async {
        match cmd {
            ProjectCmd::Create { name, public } => {
                admin::create_project(db, &name, public).await?;
                store.audit("project_create", &name, if public { "public" } else { "private" });
                println!("created {} project {name}", if public { "public" } else { "private" });
            }
            ProjectCmd::SetPublic { name, public } => {
                admin::set_public(db, &name, public).await?;
                store.audit("project_update", &name, if public { "public" } else { "private" });
                println!("project {name} is now {}", if public { "public" } else { "private" });
            }
            ProjectCmd::Member { project, user, role } => {
                let r = match role.as_str() {
                    "none" => None,
                    other => Some(Role::parse(other).ok_or_else(|| {
                        format!("unknown role {other:?}: use guest, developer, maintainer, admin or none")
                    })?),
                };
                admin::set_member(db, &project, &user, r).await?;
                store.audit("member_set", &format!("{project}/{user}"), &role);
                println!("{user} in {project}: {role}");
            }
            ProjectCmd::Usage { project } => {
                let bytes = opened.meta.project_usage(&project).await?;
                println!("{project}\t{bytes} bytes");
            }
            ProjectCmd::Members { project } => {
                for (u, r) in admin::list_members(db, &project).await? {
                    println!("{u}\t{}", r.as_str());
                }
            }
            ProjectCmd::Delete { name } => {
                admin::delete_project(db, &name).await?;
                store.audit("project_delete", &name, "");
                println!("deleted project {name}");
            }
            ProjectCmd::List => {
                for p in admin::list_projects(db).await? {
                    println!("{}\t{}", p.name, if p.public { "public" } else { "private" });
                }
            }
        }
        Ok(())
    })
}

pub fn robot(store: Store, cmd: RobotCmd) -> Result<(), BoxError> {
    let rt = runtime()?;
    let opened = store.open(&rt)?;
    let db = opened.identity.as_ref();
    rt.block_on(async {
        match cmd {
            RobotCmd::Create {
                name,
                grants,
                expires,
                description,
            } => {
                let parsed = grants
                    .iter()
                    .map(|g| admin::parse_grant(g))
                    .collect::<Result<Vec<_>, _>>()?;
                let ttl = expires.as_deref().map(admin::parse_duration).transpose()?;
                let (r, secret) = admin::create_robot(db, &name, parsed, ttl, &description).await?;
                store.audit("robot_create", &r.name, &grants.join(" "));
                eprintln!("created {}; its secret is shown only now:", r.name);
                println!("{secret}");
            }
            RobotCmd::Revoke { name } => {
                admin::revoke_robot(db, &name).await?;
                store.audit("robot_revoke", &name, "");
                println!("revoked {name}");
            }
            RobotCmd::List => {
                for r in admin::list_robots(db).await? {
                    let grants: Vec<String> = r
                        .grants
                        .iter()
                        .map(|g| format!("{}:{}", g.project, g.actions.join(",")))
                        .collect();
                    let state = if r.revoked {
                        "revoked".to_string()
                    } else {
                        match r.expires_at {
                            Some(t) if t <= auth::now() => "expired".to_string(),
                            Some(t) => format!("expires {}", observe::time::rfc3339_unix(t)),
                            None => "active".to_string(),
                        }
                    };
                    println!("{}\t{}\t{state}", r.name, grants.join(" "));
                }
            }
        }
        Ok(())
    })
}

pub fn audit_cmd(args: AuditArgs) -> Result<(), BoxError> {
    let path = args.store.dir().join("audit.log");
    let q = AuditQuery {
        actor: args.actor,
        action: args.action,
        resource: args.resource,
        result: args.result,
        since: args.since,
        last: args.last,
    };
    let records = audit::query(&path, &q).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for r in records {
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{}  {:<14} {:<7} {:<20} {:<40} {} {}",
                r.time, r.action, r.result, r.actor, r.resource, r.client, r.detail
            );
        }
    }
    Ok(())
}
