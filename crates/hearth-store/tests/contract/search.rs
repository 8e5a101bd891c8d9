//! Search over current resources: type, `_id`, `_lastUpdated`, keyset paging and totals.

use std::sync::Arc;

use hearth_store::{Backend, SearchPage, SearchQuery};

use crate::support::*;

fn query(resource_type: &str) -> SearchQuery {
    SearchQuery {
        resource_type: resource_type.to_owned(),
        count: 100,
        ..SearchQuery::default()
    }
}

async fn search(store: &Arc<dyn Backend>, query: SearchQuery) -> SearchPage {
    store.search(query).await.expect("search")
}

pub async fn search_returns_current_resources_of_one_type_in_seq_order(store: Arc<dyn Backend>) {
    write_each(
        &store,
        vec![
            put(&patient("p3", "C")),
            put(&patient("p1", "A")),
            put(&observation("o1", "Patient/p1", 70)),
            put(&patient("p2", "B")),
        ],
    )
    .await;
    let page = search(&store, query("Patient")).await;
    assert_eq!(ids(&page.resources), ["p3", "p1", "p2"]);
    assert!(page.resources.iter().all(|r| r.resource_type == "Patient"));
    assert_eq!(page.next_after_seq, None);
    assert_eq!(page.total, None, "no total unless asked for");
    let seqs: Vec<_> = page.resources.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]));

    // An update moves a resource to the end of the change order.
    write_one(&store, put(&patient("p3", "C2"))).await;
    let page = search(&store, query("Patient")).await;
    assert_eq!(ids(&page.resources), ["p1", "p2", "p3"]);
    assert_eq!(page.resources[2].version, 2);

    assert_eq!(
        ids(&search(&store, query("Observation")).await.resources),
        ["o1"]
    );
    let none = search(&store, query("Encounter")).await;
    assert!(none.resources.is_empty());
    assert_eq!(none.next_after_seq, None);
}

pub async fn search_leaves_out_deleted_and_superseded_versions(store: Arc<dyn Backend>) {
    write_each(
        &store,
        vec![
            put(&patient("p1", "A1")),
            put(&patient("p2", "B")),
            put(&patient("p3", "C1")),
            put(&patient("p1", "A2")),
            delete("Patient", "p2"),
            delete("Patient", "p3"),
            put(&patient("p1", "A3")),
            put(&patient("p3", "C2")),
        ],
    )
    .await;
    let page = search(
        &store,
        SearchQuery {
            total: true,
            ..query("Patient")
        },
    )
    .await;
    let found: Vec<(&str, u64)> = page
        .resources
        .iter()
        .map(|r| (r.id.as_str(), r.version))
        .collect();
    assert_eq!(found, [("p1", 3), ("p3", 3)]);
    assert!(page.resources.iter().all(|r| !r.deleted));
    assert_eq!(page.total, Some(2));
    assert_eq!(field(&page.resources[0].body, "name")[0]["family"], "A3");
}

pub async fn search_by_id_list_returns_only_those_ids(store: Arc<dyn Backend>) {
    write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&patient("p2", "B")),
            put(&observation("p2", "Patient/p1", 70)),
            put(&patient("p3", "C")),
            put(&patient("p4", "D")),
        ],
    )
    .await;
    let by_ids = |list: &[&str]| SearchQuery {
        ids: list.iter().map(|id| id.to_string()).collect(),
        total: true,
        ..query("Patient")
    };
    let page = search(&store, by_ids(&["p4", "p2", "nope"])).await;
    assert_eq!(ids(&page.resources), ["p2", "p4"]);
    assert!(page.resources.iter().all(|r| r.resource_type == "Patient"));
    assert_eq!(page.total, Some(2));
    assert!(search(&store, by_ids(&["nope"])).await.resources.is_empty());
}

pub async fn search_by_last_updated_window_is_exclusive_at_both_ends(store: Arc<dyn Backend>) {
    let w = write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&patient("p2", "B")),
            put(&patient("p3", "C")),
        ],
    )
    .await;
    let window = |after: Option<i64>, before: Option<i64>| SearchQuery {
        updated_after: after,
        updated_before: before,
        total: true,
        ..query("Patient")
    };
    let (t1, t2, t3) = (w[0].last_updated, w[1].last_updated, w[2].last_updated);
    let page = search(&store, window(Some(t1), None)).await;
    assert_eq!(ids(&page.resources), ["p2", "p3"]);
    assert_eq!(page.total, Some(2));
    let page = search(&store, window(None, Some(t3))).await;
    assert_eq!(ids(&page.resources), ["p1", "p2"]);
    assert_eq!(page.total, Some(2));
    let page = search(&store, window(Some(t1), Some(t3))).await;
    assert_eq!(ids(&page.resources), ["p2"]);
    assert_eq!(page.total, Some(1));
    assert_eq!(
        ids(&search(&store, window(Some(t1 - 1), Some(t2 + 1)))
            .await
            .resources),
        ["p1", "p2"]
    );
    assert!(
        search(&store, window(Some(t3), None))
            .await
            .resources
            .is_empty()
    );
    assert!(
        search(&store, window(None, Some(t1)))
            .await
            .resources
            .is_empty()
    );

    // The window applies to the current version: p1's first version does not bring it back.
    let update = write_one(&store, put(&patient("p1", "A2"))).await;
    let page = search(&store, window(None, Some(update.last_updated))).await;
    assert_eq!(ids(&page.resources), ["p2", "p3"]);
    let page = search(&store, window(Some(t3), None)).await;
    assert_eq!(ids(&page.resources), ["p1"]);
}

pub async fn search_pages_by_keyset_with_a_stable_total(store: Arc<dyn Backend>) {
    let names = ["p5", "p2", "p4", "p1", "p3"];
    write_each(
        &store,
        names.iter().map(|id| put(&patient(id, "X"))).collect(),
    )
    .await;
    let page_after = |after_seq| SearchQuery {
        after_seq,
        count: 2,
        total: true,
        ..query("Patient")
    };
    let first = search(&store, page_after(0)).await;
    assert_eq!(ids(&first.resources), ["p5", "p2"]);
    assert_eq!(first.total, Some(5));
    let cursor = first.next_after_seq.expect("a second page");
    assert_eq!(
        cursor, first.resources[1].seq,
        "the cursor is the page's last seq"
    );
    let second = search(&store, page_after(cursor)).await;
    assert_eq!(ids(&second.resources), ["p4", "p1"]);
    assert_eq!(
        second.total,
        Some(5),
        "the total counts the whole search, not what is left"
    );
    let last = search(
        &store,
        page_after(second.next_after_seq.expect("a third page")),
    )
    .await;
    assert_eq!(ids(&last.resources), ["p3"]);
    assert_eq!(last.total, Some(5));
    assert_eq!(last.next_after_seq, None);

    let exact = search(
        &store,
        SearchQuery {
            count: 5,
            ..query("Patient")
        },
    )
    .await;
    assert_eq!(exact.resources.len(), 5);
    assert_eq!(
        exact.next_after_seq, None,
        "a full last page has no next page"
    );
}

pub async fn search_with_count_zero_returns_only_the_total(store: Arc<dyn Backend>) {
    write_each(
        &store,
        vec![
            put(&patient("p1", "A")),
            put(&patient("p2", "B")),
            put(&patient("p3", "C")),
            delete("Patient", "p2"),
        ],
    )
    .await;
    let page = search(
        &store,
        SearchQuery {
            count: 0,
            total: true,
            ..query("Patient")
        },
    )
    .await;
    assert!(page.resources.is_empty());
    assert_eq!(page.total, Some(2));
    assert_eq!(page.next_after_seq, None);
}
