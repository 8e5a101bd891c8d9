//! The behavioural contract of a Hearth storage backend: one suite of checks over the `Store`,
//! `JobStore`, `ScanSource` and `ClientStore` traits, run unchanged against every backend.
//!
//! Each check is `pub async fn check(store: Arc<dyn Backend>)` on a fresh, empty store and
//! asserts only on what the traits return, never on a backend's tables, so a new backend is
//! held to exactly what the export engine, the REST layer and the authorization server rely on.
//! [`contract_suite!`] turns every check into one test per backend (the pattern of
//! `object_store`'s `integration` module).
//!
//! Run with `cargo test -p hearth-store --test contract`.

mod clients;
mod jobs;
mod leases;
mod resources;
mod scans;
mod search;
mod support;

use std::cell::RefCell;
use std::sync::Arc;

use hearth_store::{Backend, SqliteStore};

/// One `#[tokio::test]` per check, in a module named after the backend. `$open` is an async fn
/// returning `Option<Arc<dyn Backend>>` on a fresh, empty store; `None` means the backend is
/// not available here, and the test says so on stderr and passes.
macro_rules! contract_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            contract_tests! {
                $open;
                resources::writes_report_created_updated_unchanged_and_deleted_with_versions,
                resources::unchanged_update_keeps_version_seq_and_last_updated,
                resources::queued_batches_each_commit_with_their_own_results,
                resources::stored_body_carries_the_version_and_last_updated_of_its_write,
                resources::read_returns_a_tombstone_after_delete_and_none_for_unknown,
                resources::read_version_returns_each_stored_version,
                resources::history_is_newest_first_and_pages_by_before_version,
                resources::if_match_conflict_reports_the_current_version_and_writes_nothing,
                resources::delete_of_an_absent_resource_is_not_present,
                resources::seq_and_last_updated_increase_strictly_across_writes,
                resources::seq_at_maps_instants_to_the_last_seq_at_or_before_them,
                resources::atomic_batch_commits_every_entry_and_answers_in_entry_order,
                resources::atomic_batch_rolls_everything_back_when_an_entry_conflicts,
                resources::independent_batch_answers_each_entry_on_its_own_in_entry_order,
                search::search_returns_current_resources_of_one_type_in_seq_order,
                search::search_leaves_out_deleted_and_superseded_versions,
                search::search_by_id_list_returns_only_those_ids,
                search::search_by_last_updated_window_is_exclusive_at_both_ends,
                search::search_pages_by_keyset_with_a_stable_total,
                search::search_with_count_zero_returns_only_the_total,
                jobs::snapshot_covers_every_committed_write_and_precedes_later_ones,
                jobs::type_range_counts_every_version_of_the_type_in_the_window,
                jobs::current_ids_and_keys_list_the_resources_current_at_the_seq,
                jobs::types_present_lists_types_with_a_version_in_the_window,
                jobs::compartment_rows_count_versions_in_the_patients_compartments,
                jobs::inserted_job_reads_back_with_every_field,
                jobs::record_poll_returns_the_count_before_and_remembers_manifest_shown,
                jobs::active_jobs_counts_only_unfinished_jobs_of_the_client,
                jobs::complete_job_stores_the_manifest_and_cannot_revive_a_cancelled_job,
                jobs::fail_job_records_the_error_and_finishes_the_job,
                jobs::job_files_come_in_manifest_order,
                jobs::add_job_files_and_file_lookup_return_the_file_with_its_job,
                jobs::cancel_of_a_running_job_cancels_it_and_drops_its_files,
                jobs::cancel_of_an_unknown_or_cancelled_job_is_not_found,
                jobs::cancel_after_the_manifest_was_shown_removes_the_job,
                jobs::cancel_of_a_completed_job_never_shown_cancels_it,
                jobs::expired_jobs_lists_completed_past_expiry_and_old_failed_or_cancelled,
                jobs::ready_jobs_lists_unfinished_jobs_without_open_units,
                jobs::delete_job_removes_the_job_its_units_and_its_files,
                leases::claim_takes_the_oldest_job_first_then_unit_order,
                leases::claimed_unit_carries_its_plan_and_starts_the_job,
                leases::an_unexpired_lease_is_not_claimed_again,
                leases::an_expired_lease_is_claimed_again_with_the_next_attempt,
                leases::renew_lease_holds_the_unit_for_the_current_attempt_only,
                leases::commit_is_fenced_for_a_stale_attempt_and_counts_the_current_one,
                leases::commit_of_an_already_committed_claim_is_fenced,
                leases::provenance_units_wait_until_every_other_unit_of_the_job_is_done,
                leases::cancel_fences_units_in_flight_and_stops_claims,
                leases::committed_units_and_unit_files_cover_only_committed_units_in_the_range,
                scans::scan_all_sees_the_versions_visible_at_the_snapshot,
                scans::scan_stays_inside_the_units_seq_window,
                scans::scan_deleted_returns_the_tombstones_of_the_window,
                scans::scan_compartment_and_outside_split_resources_by_compartment,
                scans::scan_patients_returns_the_units_patients_rows_with_via_patient,
                scans::scan_patient_blocks_come_patient_by_patient_with_the_patient_first,
                scans::scan_patients_deleted_passes_the_ended_body_of_shared_tombstones,
                scans::scan_stops_when_the_consumer_returns_false,
                clients::clients_are_put_replaced_listed_by_id_and_removed,
                clients::record_jti_refuses_a_replay_until_the_entry_expires,
                clients::signing_secret_is_kept_from_the_first_call,
            }
        }
    };
}

macro_rules! contract_tests {
    ($open:expr; $($module:ident :: $check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(store) = $open().await else {
                    eprintln!(
                        "SKIPPED {}::{}: the backend is not available",
                        module_path!(),
                        stringify!($check)
                    );
                    return;
                };
                crate::$module::$check(std::sync::Arc::clone(&store)).await;
                // Closing is part of the contract too, and lets a backend flush before its
                // scratch data is removed.
                store.close().await.expect("close the store");
            }
        )+
    };
}

thread_local! {
    /// The data directories of the SQLite stores this test thread opened. `open_sqlite` must
    /// return only the store, yet the directory has to outlive it: libtest runs each test on a
    /// thread of its own, and `#[tokio::test]` polls the test body on that thread, so the
    /// directories are removed when the test ends, pass or fail.
    static SQLITE_DIRS: RefCell<Vec<tempfile::TempDir>> = const { RefCell::new(Vec::new()) };
}

async fn open_sqlite() -> Option<Arc<dyn Backend>> {
    let dir = tempfile::TempDir::new().expect("create a scratch directory");
    let store = SqliteStore::open(dir.path()).expect("open a fresh SQLite store");
    SQLITE_DIRS.with(|dirs| dirs.borrow_mut().push(dir));
    Some(Arc::new(store))
}

contract_suite!(sqlite, open_sqlite);

// Every test gets a PostgreSQL database of its own; without a server the tests say they are
// skipped, unless HEARTH_REQUIRE_POSTGRES=1 makes that a failure.
async fn open_postgres() -> Option<Arc<dyn Backend>> {
    let store = hearth_store::postgres::testing::fresh_store().await?;
    Some(Arc::new(store))
}

contract_suite!(postgres, open_postgres);
