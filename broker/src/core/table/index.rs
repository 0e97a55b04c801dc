//! A document index of one table partition ([`skein_client::index`]): the indexed field's
//! values to the keys holding them, over every version the partition keeps.
//!
//! An entry `(value, key)` says some kept version of `key` held `value`; a query at a
//! snapshot reads each candidate key at it and keeps the row only if the version visible
//! there still holds the value, so the answer is exact at the snapshot while entries of
//! older versions wait for their versions to be pruned. The index is derived state: it is
//! not in the partition's snapshot, and a replica builds it from its rows (in steps, so a
//! large partition never stalls its shard) when it learns the definition or restarts.

use std::collections::BTreeSet;

use skein_client::index::field_value;

use super::Key;

/// One document index of a partition.
#[derive(Clone, Debug)]
pub struct DocIndex {
    /// The indexed field.
    pub(super) field: String,
    /// `(value, key)` for every kept version of `key` whose value holds the field.
    pub(super) entries: BTreeSet<(Vec<u8>, Key)>,
    /// While the first pass runs: the first key not indexed yet (None: built). Writes to
    /// keys below it are indexed as they are applied; keys from it on, by the pass.
    pub(super) next: Option<Key>,
    /// Keys the first pass has indexed.
    pub(super) done: u64,
}

impl DocIndex {
    /// A new index of `field`, not built.
    pub fn new(field: &str) -> DocIndex {
        DocIndex { field: field.to_owned(), entries: BTreeSet::new(), next: Some(Vec::new()), done: 0 }
    }

    /// Its field.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Whether its first pass is done.
    pub fn built(&self) -> bool {
        self.next.is_none()
    }

    /// Whether a write to `key` is indexed as it is applied (the pass has gone past it).
    pub(super) fn covers(&self, key: &[u8]) -> bool {
        self.next.as_ref().is_none_or(|n| key < n.as_slice())
    }

    /// Indexes one version of `key`.
    pub(super) fn add(&mut self, key: &[u8], value: Option<&[u8]>) {
        if let Some(v) = value.and_then(|v| field_value(v, &self.field)) {
            self.entries.insert((v, key.to_vec()));
        }
    }

    /// The field values of `versions` (one key's).
    pub(super) fn values_of<'a>(&self, versions: impl Iterator<Item = Option<&'a [u8]>>) -> BTreeSet<Vec<u8>> {
        versions.filter_map(|v| field_value(v?, &self.field)).collect()
    }

    /// The keys with an entry for `value`, in key order.
    pub(super) fn candidates<'a>(&'a self, value: &[u8]) -> impl Iterator<Item = &'a Key> + 'a {
        let value = value.to_vec();
        let from = (value.clone(), Vec::new());
        self.entries.range(from..).take_while(move |(v, _)| *v == value).map(|(_, k)| k)
    }
}
