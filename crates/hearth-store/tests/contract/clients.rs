//! The client registry, the assertion replay cache and the token signing secret.

use std::sync::Arc;

use hearth_store::Backend;
use hearth_store::clients::ClientRecord;

fn client(id: &str) -> ClientRecord {
    ClientRecord {
        id: id.to_owned(),
        jwks_url: Some(format!("https://{id}.example.org/jwks.json")),
        jwks: None,
        scope: Some("system/*.rs".into()),
        created_at: 1_000,
    }
}

pub async fn clients_are_put_replaced_listed_by_id_and_removed(store: Arc<dyn Backend>) {
    assert!(store.clients().await.unwrap().is_empty());
    assert!(!store.put_client(client("b")).await.unwrap(), "b is new");
    assert!(!store.put_client(client("a")).await.unwrap(), "a is new");
    let replacement = ClientRecord {
        jwks_url: None,
        jwks: Some(r#"{"keys":[]}"#.into()),
        scope: None,
        created_at: 2_000,
        ..client("a")
    };
    assert!(
        store.put_client(replacement.clone()).await.unwrap(),
        "a was replaced"
    );
    assert_eq!(store.client("a").await.unwrap(), Some(replacement.clone()));
    assert_eq!(store.client("b").await.unwrap(), Some(client("b")));
    assert_eq!(store.clients().await.unwrap(), [replacement, client("b")]);

    assert!(store.remove_client("a").await.unwrap());
    assert!(!store.remove_client("a").await.unwrap(), "already removed");
    assert_eq!(store.client("a").await.unwrap(), None);
    assert_eq!(store.clients().await.unwrap(), [client("b")]);
}

pub async fn record_jti_refuses_a_replay_until_the_entry_expires(store: Arc<dyn Backend>) {
    assert!(store.record_jti("a", "j1", 100, 0).await.unwrap());
    assert!(
        !store.record_jti("a", "j1", 100, 50).await.unwrap(),
        "a replay"
    );
    assert!(
        !store.record_jti("a", "j1", 200, 99).await.unwrap(),
        "a replay, later expiry"
    );
    assert!(
        store.record_jti("b", "j1", 100, 50).await.unwrap(),
        "another client's jti"
    );
    assert!(
        store.record_jti("a", "j2", 100, 50).await.unwrap(),
        "another jti"
    );
    // Past its expiry the entry is dropped and the jti may be used again.
    assert!(store.record_jti("a", "j1", 300, 201).await.unwrap());
    assert!(!store.record_jti("a", "j1", 300, 250).await.unwrap());
}

pub async fn signing_secret_is_kept_from_the_first_call(store: Arc<dyn Backend>) {
    let first = store.signing_secret(vec![1; 32]).await.unwrap();
    assert_eq!(first, vec![1; 32]);
    assert_eq!(store.signing_secret(vec![2; 32]).await.unwrap(), first);
    assert_eq!(store.signing_secret(Vec::new()).await.unwrap(), first);
}
