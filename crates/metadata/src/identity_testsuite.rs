//! The shared test suite every `IdentityStore` backend must pass.

use crate::identity::{IdentityStore, Project, Robot, RobotGrant, Role, User};

fn user(name: &str, admin: bool) -> User {
    User {
        name: name.into(),
        password_hash: format!("hash-of-{name}"),
        system_admin: admin,
        created: 1,
        generation: 0,
    }
}

pub async fn run_all(store: &dyn IdentityStore) {
    users(store).await;
    projects_and_members(store).await;
    robots(store).await;
}

pub async fn users(store: &dyn IdentityStore) {
    assert_eq!(store.get_user("alice").await.unwrap(), None);
    store.put_user(&user("alice", false)).await.unwrap();
    store.put_user(&user("root", true)).await.unwrap();
    assert_eq!(store.get_user("alice").await.unwrap(), Some(user("alice", false)));
    // Replacing keeps one record.
    let mut a = user("alice", false);
    a.password_hash = "new".into();
    store.put_user(&a).await.unwrap();
    assert_eq!(store.get_user("alice").await.unwrap().unwrap().password_hash, "new");
    assert!(store
        .update_user("alice", Box::new(|u: &mut User| u.generation += 7))
        .await
        .unwrap());
    let a = store.get_user("alice").await.unwrap().unwrap();
    assert_eq!((a.generation, a.password_hash.as_str()), (7, "new"));
    assert!(!store.update_user("nobody", Box::new(|_: &mut User| {})).await.unwrap());
    let names: Vec<String> = store.list_users().await.unwrap().into_iter().map(|u| u.name).collect();
    assert!(names.contains(&"alice".to_string()) && names.contains(&"root".to_string()));
    assert!(store.delete_user("root").await.unwrap());
    assert!(!store.delete_user("root").await.unwrap());
    assert_eq!(store.get_user("root").await.unwrap(), None);
}

pub async fn projects_and_members(store: &dyn IdentityStore) {
    let p = Project {
        name: "team".into(),
        public: false,
        created: 1,
    };
    store.put_project(&p).await.unwrap();
    assert_eq!(store.get_project("team").await.unwrap(), Some(p.clone()));
    store.put_user(&user("bob", false)).await.unwrap();
    store.put_user(&user("carol", false)).await.unwrap();
    store.set_member("team", "bob", Some(Role::Developer)).await.unwrap();
    store.set_member("team", "carol", Some(Role::Guest)).await.unwrap();
    store.set_member("other", "bob", Some(Role::Admin)).await.unwrap();
    assert_eq!(store.get_role("team", "bob").await.unwrap(), Some(Role::Developer));
    assert_eq!(store.get_role("team", "nobody").await.unwrap(), None);
    let mut members = store.list_members("team").await.unwrap();
    members.sort();
    assert_eq!(
        members,
        vec![("bob".to_string(), Role::Developer), ("carol".to_string(), Role::Guest)]
    );
    // Changing and removing a role.
    store.set_member("team", "bob", Some(Role::Maintainer)).await.unwrap();
    assert_eq!(store.get_role("team", "bob").await.unwrap(), Some(Role::Maintainer));
    store.set_member("team", "carol", None).await.unwrap();
    assert_eq!(store.get_role("team", "carol").await.unwrap(), None);
    // Deleting a user removes their memberships everywhere.
    assert!(store.delete_user("bob").await.unwrap());
    assert_eq!(store.get_role("team", "bob").await.unwrap(), None);
    assert_eq!(store.get_role("other", "bob").await.unwrap(), None);
    // Deleting a project removes its memberships.
    store.set_member("team", "carol", Some(Role::Guest)).await.unwrap();
    assert!(store.delete_project("team").await.unwrap());
    assert!(store.list_members("team").await.unwrap().is_empty());
    assert!(!store.delete_project("team").await.unwrap());
    assert!(store.list_projects().await.unwrap().iter().all(|p| p.name != "team"));
}

pub async fn robots(store: &dyn IdentityStore) {
    let r = Robot {
        name: "robot$ci".into(),
        secret_hash: "h".into(),
        grants: vec![RobotGrant {
            project: "team".into(),
            actions: vec!["pull".into(), "push".into()],
        }],
        expires_at: Some(100),
        revoked: false,
        description: "CI pipeline".into(),
        created: 1,
    };
    store.put_robot(&r).await.unwrap();
    assert_eq!(store.get_robot("robot$ci").await.unwrap(), Some(r.clone()));
    let mut revoked = r.clone();
    revoked.revoked = true;
    store.put_robot(&revoked).await.unwrap();
    assert!(store.get_robot("robot$ci").await.unwrap().unwrap().revoked);
    assert_eq!(store.list_robots().await.unwrap().len(), 1);
}
