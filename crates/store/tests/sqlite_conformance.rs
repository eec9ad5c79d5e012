//! The conformance suite (tests/conformance) against the SQLite store, both
//! in memory and in a file.

mod conformance;

use std::sync::Arc;

use aishell_store::{SqliteStore, Store};

async fn in_memory() -> (Arc<dyn Store>, ()) {
    let store = SqliteStore::open("sqlite::memory:")
        .await
        .expect("open in-memory store");
    (Arc::new(store), ())
}

/// A store in a fresh file, opened through `aishell_store::open` as the
/// gateway does; the directory lives as long as the test.
async fn in_file() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("aishell.db").display());
    let store = aishell_store::open(&url).await.expect("open file store");
    (store, dir)
}

mod memory {
    crate::conformance::conformance_tests!(super::in_memory());
}

mod file {
    crate::conformance::conformance_tests!(super::in_file());
}
