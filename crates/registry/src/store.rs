//! Persistence: one SQLite database in the data directory.
//!
//! The schema is a document table keyed by (kind, account, key); see
//! `docs/decisions/0002-registry-storage.md` for why. Writes arrive as a batch of [`Op`]s and are
//! applied in one transaction.

use std::path::Path;

use rusqlite::{Connection, params};

use crate::RegistryError;

/// Kinds of stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Account,
    AccessKey,
    Thing,
    ThingType,
    Certificate,
    Policy,
    PolicyAttachment,
    ThingPrincipal,
    CaCertificate,
    RegistrationCode,
    IamUser,
    IamRole,
    ManagedPolicy,
    Session,
    RoleAlias,
    /// Static thing groups, keyed by name.
    ThingGroup,
    /// Thing group membership, keyed `{group}\n{thing}`.
    ThingGroupMember,
    /// Jobs, keyed by id.
    Job,
    /// Job executions, keyed `{job}\n{thing}`.
    JobExecution,
    /// The account's last job creation order (key "").
    JobSeq,
    /// Provisioning templates, keyed by name.
    ProvisioningTemplate,
    /// The account's enabled event types (key "").
    EventConfig,
    /// Job templates, keyed by id.
    JobTemplate,
    /// Lambda-compatible functions, keyed by name.
    Function,
    /// Custom authorizers, keyed by name.
    Authorizer,
    /// The account's default authorizer's name (key "").
    DefaultAuthorizer,
    /// Cognito identity pools, keyed by id.
    IdentityPool,
    /// Cognito identities, keyed by id.
    CognitoIdentity,
    /// IAM OpenID Connect providers, keyed by name (URL without `https://`).
    OidcProvider,
    /// Things waiting in a job's staged rollout, keyed `{job}\n{order as 16 hex digits}`.
    JobWaiting,
    /// Device shadows: keyed `{thing}/{shadow name}` (`{thing}/` for the classic shadow),
    /// never loaded into memory, read and written one by one.
    Shadow,
    /// In a cluster, the position in the cluster's registry log of the last entry this
    /// database holds (account and key ""; never loaded into memory).
    LogPosition,
    /// An account made by another process (`sekisho account create`) on a cluster node's
    /// data directory, keyed by its id, waiting for the node to write it through the log
    /// (doc: `[info, root key]`; never loaded into memory).
    AccountProposal,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Account => "account",
            Kind::AccessKey => "access_key",
            Kind::Thing => "thing",
            Kind::ThingType => "thing_type",
            Kind::Certificate => "certificate",
            Kind::Policy => "policy",
            Kind::PolicyAttachment => "policy_attachment",
            Kind::ThingPrincipal => "thing_principal",
            Kind::CaCertificate => "ca_certificate",
            Kind::RegistrationCode => "registration_code",
            Kind::IamUser => "iam_user",
            Kind::IamRole => "iam_role",
            Kind::ManagedPolicy => "iam_managed_policy",
            Kind::Session => "sts_session",
            Kind::RoleAlias => "role_alias",
            Kind::Shadow => "shadow",
            Kind::ThingGroup => "thing_group",
            Kind::ThingGroupMember => "thing_group_member",
            Kind::Job => "job",
            Kind::JobExecution => "job_execution",
            Kind::JobSeq => "job_seq",
            Kind::ProvisioningTemplate => "provisioning_template",
            Kind::EventConfig => "event_config",
            Kind::JobTemplate => "job_template",
            Kind::Function => "function",
            Kind::Authorizer => "authorizer",
            Kind::DefaultAuthorizer => "default_authorizer",
            Kind::IdentityPool => "identity_pool",
            Kind::CognitoIdentity => "cognito_identity",
            Kind::OidcProvider => "oidc_provider",
            Kind::JobWaiting => "job_waiting",
            Kind::LogPosition => "log_position",
            Kind::AccountProposal => "account_proposal",
        }
    }

    /// Every kind.
    pub(crate) const ALL: [Kind; 33] = [
        Kind::Account,
        Kind::AccessKey,
        Kind::Thing,
        Kind::ThingType,
        Kind::Certificate,
        Kind::Policy,
        Kind::PolicyAttachment,
        Kind::ThingPrincipal,
        Kind::CaCertificate,
        Kind::RegistrationCode,
        Kind::IamUser,
        Kind::IamRole,
        Kind::ManagedPolicy,
        Kind::Session,
        Kind::RoleAlias,
        Kind::ThingGroup,
        Kind::ThingGroupMember,
        Kind::Job,
        Kind::JobExecution,
        Kind::JobSeq,
        Kind::ProvisioningTemplate,
        Kind::EventConfig,
        Kind::JobTemplate,
        Kind::Function,
        Kind::Authorizer,
        Kind::DefaultAuthorizer,
        Kind::IdentityPool,
        Kind::CognitoIdentity,
        Kind::OidcProvider,
        Kind::JobWaiting,
        Kind::Shadow,
        Kind::LogPosition,
        Kind::AccountProposal,
    ];

    /// The kind stored under this name.
    pub(crate) fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One write.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Put {
        kind: Kind,
        account: String,
        key: String,
        doc: String,
    },
    Delete {
        kind: Kind,
        account: String,
        key: String,
    },
    /// Merges `doc`'s members into the stored document (JSON merge patch: a `null` member
    /// removes it), keeping the members `doc` does not name; the row must exist.
    Patch {
        kind: Kind,
        account: String,
        key: String,
        doc: String,
    },
}

/// A stored row.
pub(crate) struct Row {
    pub account: String,
    pub key: String,
    pub doc: String,
}

/// A stored row as SQLite hands it out, not copied ([`Store::each`]).
pub(crate) struct RowRef<'a> {
    pub account: &'a str,
    pub key: &'a str,
    pub doc: &'a str,
}

const MIGRATIONS: &[&str] = &[
    // 1: the document table.
    "CREATE TABLE objects (
        kind TEXT NOT NULL,
        account_id TEXT NOT NULL,
        key TEXT NOT NULL,
        doc TEXT NOT NULL,
        PRIMARY KEY (kind, account_id, key)
    ) WITHOUT ROWID;",
    // 2: deleted shadows (tombstones) move from their live key `{thing}/{name}` to keys of
    // their own, `\u{1}{thing}/{name}` (see shadows.rs).
    "UPDATE OR REPLACE objects
        SET key = char(1) || key
        WHERE kind = 'shadow' AND instr(key, char(1)) = 0 AND instr(key, '/') > 0
          AND json_extract(doc, '$.exists') = 0;",
];

pub(crate) struct Store {
    conn: Connection,
}

fn db_err(e: rusqlite::Error) -> RegistryError {
    RegistryError::Internal(format!("registry database: {e}"))
}

impl Store {
    pub(crate) fn open(path: &Path) -> Result<Store, RegistryError> {
        let conn = Connection::open(path).map_err(db_err)?;
        Store::init(conn)
    }

    /// A second, read-only connection to the database at `path` (opened by [`Store::open`]
    /// first): in WAL mode its reads see every committed write and do not wait for a
    /// commit in progress on the writer's connection.
    /// A connection of its own to the database at `path`, for a snapshot
    /// ([`Store::copy_to`]): `VACUUM INTO` is refused on a `query_only` connection.
    pub(crate) fn open_for_copy(path: &Path) -> Result<Store, RegistryError> {
        Ok(Store {
            conn: Connection::open(path).map_err(db_err)?,
        })
    }

    pub(crate) fn open_reader(path: &Path) -> Result<Store, RegistryError> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.pragma_update(None, "query_only", true)
            .map_err(db_err)?;
        Ok(Store { conn })
    }

    /// Reads the database memory-mapped (`on`), or through SQLite's page cache again. While a
    /// whole registry is loaded: each page is then read in place rather than copied into
    /// the cache (at a million devices, a quarter of the load was those copies).
    pub(crate) fn map_for_load(&self, on: bool) {
        // As much as SQLite was built to map (2 GiB by default); the rest is read as usual.
        let size: i64 = if on { 1 << 40 } else { 0 };
        let _ = self.conn.pragma_update(None, "mmap_size", size);
    }

    /// Makes every later statement on this connection fail (the table is gone), as a broken
    /// database would.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn break_for_tests(&self) {
        let _ = self
            .conn
            .execute_batch("ALTER TABLE objects RENAME TO objects_broken;");
    }

    pub(crate) fn in_memory() -> Result<Store, RegistryError> {
        Store::init(Connection::open_in_memory().map_err(db_err)?)
    }

    fn init(conn: Connection) -> Result<Store, RegistryError> {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        // FULL: a commit is synced before it returns, so an acknowledged change (a revocation
        // above all) survives power loss; NORMAL in WAL mode only survives a process crash.
        // Measured in BENCHMARKS.md (registry writes).
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db_err)?;
        let version = usize::try_from(version).unwrap_or(0);
        if version > MIGRATIONS.len() {
            return Err(RegistryError::Internal(format!(
                "registry database schema {version} is newer than this build understands ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            conn.execute_batch(&format!(
                "BEGIN; {m} PRAGMA user_version = {}; COMMIT;",
                i + 1
            ))
            .map_err(db_err)?;
        }
        Ok(Store { conn })
    }

    #[cfg(test)]
    pub(crate) fn pragma(&self, name: &str) -> i64 {
        self.conn
            .pragma_query_value(None, name, |r| r.get(0))
            .unwrap_or(-1)
    }

    #[cfg(test)]
    pub(crate) fn pragma_text(&self, name: &str) -> String {
        self.conn
            .pragma_query_value(None, name, |r| r.get(0))
            .unwrap_or_default()
    }

    /// Makes every later write fail as a full or broken disk would (tests).
    #[cfg(test)]
    pub(crate) fn fail_writes(&self, why: &str) -> Result<(), RegistryError> {
        self.conn
            .execute_batch(&format!(
                "CREATE TEMP TRIGGER fail_put BEFORE INSERT ON objects BEGIN SELECT RAISE(ABORT, '{why}'); END;
                 CREATE TEMP TRIGGER fail_upd BEFORE UPDATE ON objects BEGIN SELECT RAISE(ABORT, '{why}'); END;
                 CREATE TEMP TRIGGER fail_del BEFORE DELETE ON objects BEGIN SELECT RAISE(ABORT, '{why}'); END;"
            ))
            .map_err(db_err)
    }

    #[cfg(test)]
    pub(crate) fn fail_writes_off(&self) -> Result<(), RegistryError> {
        self.conn
            .execute_batch("DROP TRIGGER fail_put; DROP TRIGGER fail_upd; DROP TRIGGER fail_del;")
            .map_err(db_err)
    }

    /// Every row of `kind` in (account, key) order, handed to `f` one at a time as SQLite
    /// holds it (the large kinds are neither held whole in memory nor copied while they load).
    pub(crate) fn each(
        &self,
        kind: Kind,
        mut f: impl FnMut(RowRef<'_>) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT account_id, key, doc FROM objects WHERE kind = ?1 ORDER BY account_id, key",
            )
            .map_err(db_err)?;
        let mut rows = stmt.query(params![kind.as_str()]).map_err(db_err)?;
        fn text<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> Result<&'r str, RegistryError> {
            r.get_ref(i)
                .and_then(|v| v.as_str().map_err(rusqlite::Error::from))
                .map_err(db_err)
        }
        while let Some(r) = rows.next().map_err(db_err)? {
            f(RowRef {
                account: text(r, 0)?,
                key: text(r, 1)?,
                doc: text(r, 2)?,
            })?;
        }
        Ok(())
    }

    pub(crate) fn load(&self, kind: Kind) -> Result<Vec<Row>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT account_id, key, doc FROM objects WHERE kind = ?1 ORDER BY account_id, key",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![kind.as_str()], |r| {
                Ok(Row {
                    account: r.get(0)?,
                    key: r.get(1)?,
                    doc: r.get(2)?,
                })
            })
            .map_err(db_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
    }

    /// One stored document.
    pub(crate) fn get(
        &self,
        kind: Kind,
        account: &str,
        key: &str,
    ) -> Result<Option<String>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT doc FROM objects WHERE kind = ?1 AND account_id = ?2 AND key = ?3",
            )
            .map_err(db_err)?;
        let mut rows = stmt
            .query(params![kind.as_str(), account, key])
            .map_err(db_err)?;
        match rows.next().map_err(db_err)? {
            Some(r) => Ok(Some(r.get(0).map_err(db_err)?)),
            None => Ok(None),
        }
    }

    /// Stored documents whose keys lie in `(after, below)`, in key order, at most `limit`.
    pub(crate) fn range(
        &self,
        kind: Kind,
        account: &str,
        after: &str,
        below: &str,
        limit: usize,
    ) -> Result<Vec<(String, String)>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, doc FROM objects WHERE kind = ?1 AND account_id = ?2
                 AND key > ?3 AND key < ?4 ORDER BY key LIMIT ?5",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(
                params![kind.as_str(), account, after, below, limit as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(db_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
    }

    /// How many keys lie in `(after, below)`, counting no further than `limit` (keys only:
    /// the primary key's index answers it without reading documents).
    pub(crate) fn count(
        &self,
        kind: Kind,
        account: &str,
        after: &str,
        below: &str,
        limit: usize,
    ) -> Result<usize, RegistryError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT COUNT(*) FROM (SELECT 1 FROM objects WHERE kind = ?1 AND account_id = ?2
                 AND key > ?3 AND key < ?4 LIMIT ?5)",
            )
            .map_err(db_err)?;
        let n: i64 = stmt
            .query_row(
                params![kind.as_str(), account, after, below, limit as i64],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Deletes every row whose key lies in `(after, below)`; returns how many.
    pub(crate) fn delete_range(
        &mut self,
        kind: Kind,
        account: &str,
        after: &str,
        below: &str,
    ) -> Result<usize, RegistryError> {
        self.conn
            .execute(
                "DELETE FROM objects WHERE kind = ?1 AND account_id = ?2 AND key > ?3 AND key < ?4",
                params![kind.as_str(), account, after, below],
            )
            .map_err(db_err)
    }

    pub(crate) fn apply(&mut self, ops: &[Op]) -> Result<(), RegistryError> {
        if ops.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction().map_err(db_err)?;
        for op in ops {
            match op {
                Op::Put {
                    kind,
                    account,
                    key,
                    doc,
                } => {
                    tx.execute(
                        "INSERT INTO objects (kind, account_id, key, doc) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (kind, account_id, key) DO UPDATE SET doc = excluded.doc",
                        params![kind.as_str(), account, key, doc],
                    )
                    .map_err(db_err)?;
                }
                Op::Delete { kind, account, key } => {
                    tx.execute(
                        "DELETE FROM objects WHERE kind = ?1 AND account_id = ?2 AND key = ?3",
                        params![kind.as_str(), account, key],
                    )
                    .map_err(db_err)?;
                }
                Op::Patch {
                    kind,
                    account,
                    key,
                    doc,
                } => {
                    let changed = tx
                        .execute(
                            "UPDATE objects SET doc = json_patch(doc, ?4)
                             WHERE kind = ?1 AND account_id = ?2 AND key = ?3",
                            params![kind.as_str(), account, key, doc],
                        )
                        .map_err(db_err)?;
                    if changed != 1 {
                        return Err(RegistryError::Internal(format!(
                            "registry database: no stored {} {key} to update",
                            kind.as_str()
                        )));
                    }
                }
            }
        }
        tx.commit().map_err(db_err)
    }

    /// Writes a compact copy of the database to `path` (which must not exist), without this
    /// node's own documents (account proposals); returns the log position the copy holds.
    pub(crate) fn copy_to(&self, path: &Path) -> Result<u64, RegistryError> {
        let target = path
            .to_str()
            .ok_or_else(|| RegistryError::Internal("a snapshot path that is not UTF-8".into()))?;
        self.conn
            .execute("VACUUM INTO ?1", params![target])
            .map_err(db_err)?;
        let copy = Connection::open(path).map_err(db_err)?;
        copy.execute(
            "DELETE FROM objects WHERE kind = ?1",
            params![Kind::AccountProposal.as_str()],
        )
        .map_err(db_err)?;
        let position: Option<String> = copy
            .query_row(
                "SELECT doc FROM objects WHERE kind = ?1 AND account_id = '' AND key = ''",
                params![Kind::LogPosition.as_str()],
                |r| r.get(0),
            )
            .ok();
        Ok(position.and_then(|p| p.parse().ok()).unwrap_or(0))
    }

    /// Puts every document of the database at `path` (a [`Store::copy_to`] copy) into this
    /// one, in one transaction.
    pub(crate) fn copy_from(&mut self, path: &Path) -> Result<(), RegistryError> {
        let source = path
            .to_str()
            .ok_or_else(|| RegistryError::Internal("a snapshot path that is not UTF-8".into()))?;
        self.conn
            .execute("ATTACH DATABASE ?1 AS snapshot", params![source])
            .map_err(db_err)?;
        let copied = (|| {
            let tx = self.conn.transaction().map_err(db_err)?;
            tx.execute(
                "INSERT OR REPLACE INTO objects (kind, account_id, key, doc)
                 SELECT kind, account_id, key, doc FROM snapshot.objects",
                [],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)
        })();
        let detached = self
            .conn
            .execute("DETACH DATABASE snapshot", [])
            .map_err(db_err);
        copied.and(detached.map(|_| ()))
    }

    /// Deletes every document but this node's account proposals ([`Registry::clear_replica`]).
    pub(crate) fn clear_replica(&mut self) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "DELETE FROM objects WHERE kind != ?1",
                params![Kind::AccountProposal.as_str()],
            )
            .map(|_| ())
            .map_err(db_err)
    }

    /// Flushes the write-ahead log into the database file (at shutdown).
    pub(crate) fn checkpoint(&self) -> Result<(), RegistryError> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(db_err)
    }
}
