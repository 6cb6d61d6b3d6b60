//! The seam to other nodes of a cluster: what this node's broker tells them, and nothing else.
//!
//! A single node has no peers. In a cluster (`sekisho-cluster`), every node's broker calls
//! its [`Peers`] with two things, in the order they happen under its lock:
//! - its **interest**: the first subscription of a filter in an account on this node, and the
//!   last one gone (a filter counted once however many sessions hold it, so that the other
//!   nodes send this node a message once, not once per subscriber);
//! - every message **published** on this node (by a client, a service, a will or an event),
//!   after it was accepted (rate and retained quota), so that the nodes with interest route it
//!   to their own subscribers. A message that came from a peer is never sent on.
//!
//! The node that receives a message decides AWS's exact matching with its own trie
//! ([`crate::Broker::publish_from_peer`]); the interest only narrows what travels. Retained
//! messages reach every node's copy through [`crate::Broker::set_retained_from_peer`].
//!
//! Both calls are made under the broker's lock: an implementation only queues (never blocks,
//! never calls back into the broker).

use std::sync::Arc;

use crate::Message;

/// The other nodes of a cluster, as the broker sees them.
pub trait Peers: Send + Sync + std::fmt::Debug {
    /// This node's first subscription to `filter` in `account` (`on`), or its last one gone.
    /// `filter` is as subscribed, with its `$share/{group}/` prefix if it has one. Returns the
    /// change's number, for [`Peers::interest_done`].
    fn interest(&self, account: &str, filter: &str, on: bool) -> u64;

    /// A message published on this node in `account`, accepted and routed here.
    fn forward(&self, account: &str, message: &Arc<Message>);

    /// Whether the cluster picks the members of shared subscriptions now (its link is up):
    /// if not, this node picks among its own members, as a single node does.
    fn routes_groups(&self) -> bool;

    /// Resolves once the interest changes up to number `mark` are in force at NATS (or the
    /// cluster gave up on them): the other nodes send this node what matches them. A SUBACK
    /// waits for its filter's, so that a message published elsewhere after it is not missed.
    /// Resolves at once while the link is down (a CONNECT would not get in then anyway).
    fn interest_done(
        &self,
        mark: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// A claim granted: its number in the cluster's order, and the node that claimed the client id
/// before, when another (it may hold the client id's persistent session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The claim's number.
    pub number: u64,
    /// The node (its name) that claimed the client id last before, if not this one and if
    /// asked for.
    pub previous: Option<String>,
}

/// What a claim does about the node that claimed the client id before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// Nothing.
    Ignore,
    /// Tells it ([`Claimed::previous`]).
    Tell,
    /// Refuses the claim when it was another node.
    Refuse,
}

/// Why a claim was not granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimError {
    /// The cluster could not order it (unreachable, or a later claim elsewhere won): the
    /// CONNECT is refused as Server unavailable.
    Unavailable(String),
    /// [`Previous::Refuse`] and another node claimed the client id before: refused as Not
    /// authorized.
    Refused(String),
}

/// What [`Claims::claim`] resolves to.
pub type ClaimFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Claimed, ClaimError>> + Send>>;

/// A session moved here ([`Claims::handover`]): how many messages it brought, and the interest
/// number its filters got (the CONNACK waits until the cluster has them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Messages queued in it.
    pub queued: usize,
    /// The highest interest number of its filters.
    pub mark: u64,
}

/// What [`Claims::reclaim_will`] resolves to.
pub type ReclaimFuture = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// What [`Claims::handover`] resolves to.
pub type HandoverFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<Moved>> + Send>>;

/// Cluster-wide ownership of client ids: one connection per client id in the whole cluster.
///
/// Every CONNECT claims its client id before it attaches; claims are numbered in one order
/// across the cluster, and a connection whose claim a later one (on another node) follows is
/// ended as taken over, so exactly the latest claim's connection survives any race. Takeovers
/// on one node stay the broker's own.
pub trait Claims: Send + Sync + std::fmt::Debug {
    /// Claims `client_id` in `account` for a connection about to attach here: its number in the
    /// cluster's order, or why not (the cluster cannot be reached, or a later claim elsewhere
    /// won already); then the connection is refused.
    /// `previous` says what to do about the node that claimed it last before (one more round
    /// trip: only a CONNECT that would resume a session, or a provisioning claim's, needs it).
    /// `keep`: the session expiry the connection asked for; the claim is remembered that long
    /// (plus a margin), since it names where the session lives.
    /// `testament`: what the cluster publishes for the connection if this node dies while it
    /// is connected (see [`Orphans`]).
    fn claim(
        &self,
        account: &str,
        client_id: &str,
        previous: Previous,
        keep: std::time::Duration,
        testament: Option<Testament>,
    ) -> ClaimFuture;

    /// Asks node `from` for the persistent session of `client_id`, for the connection of
    /// claim `claim`, and puts it in this node's broker (replacing any here): `from` ends its
    /// connection of the client id first (unless its own claim is later), and drops the session
    /// once this node acknowledged it. `None` when it has none, or cannot be asked.
    fn handover(&self, from: &str, account: &str, client_id: &str, claim: u64) -> HandoverFuture;

    /// Tells node `from` that `client_id` started clean here: its session there, if any, is
    /// dropped (MQTT: a clean start discards the session). Nothing is waited for.
    fn discard(&self, from: &str, account: &str, client_id: &str, claim: u64);

    /// The connection `epoch` attached under claim `claim`: a later claim elsewhere ends it.
    /// Called once for every claim granted.
    fn attached(&self, account: &str, client_id: &str, claim: u64, epoch: u64);

    /// The connection `epoch` ended: its testament no longer holds, but for `leaves` (what
    /// waits after it: a delayed will, with [`Testament::will_due_ms`] set).
    fn ended(&self, account: &str, client_id: &str, epoch: u64, leaves: Option<Testament>);

    /// A delayed will this node holds for `client_id` (left by an ended connection,
    /// [`Claims::ended`], due at `due_ms`): true if this node is to publish it, because its
    /// claim still carries it in this node's name and this node took it (conditionally on the
    /// claim's sequence, so that an adopter and this node never both do), or there is no claim
    /// and the will is not long overdue. False if another node adopted it or the client id
    /// was claimed again (or the cluster did not answer: a will twice is the worse outcome).
    /// `hold`: the claim keeps the will in this run's name (at start-up, for a will published
    /// later); else the will comes off it (just before it is published).
    fn reclaim_will(
        &self,
        account: &str,
        client_id: &str,
        due_ms: u64,
        hold: bool,
    ) -> ReclaimFuture;
}

/// What a connection leaves if its node dies while it is connected: AWS's disconnection event
/// (`disconnectReason` `SERVER_ERROR`) and its will. Kept with its claim; another node
/// publishes it ([`Orphans`]) once the node is seen dead.
#[derive(Debug, Clone, PartialEq)]
pub struct Testament {
    /// The connection's session identifier (lifecycle events).
    pub session_identifier: String,
    /// Its principal as lifecycle events name it.
    pub principal: String,
    /// The thing exclusively associated with it, if any (lifecycle events' `thingName`).
    pub thing_name: Option<String>,
    /// The certificate it authenticated with: a will is published only for a certificate
    /// principal, authorized again with the certificate's policies when it is sent (as a will
    /// stored across a restart is).
    pub certificate: Option<String>,
    /// Its will: the delay (never past the session's end) and the message.
    pub will: Option<(std::time::Duration, Message)>,
    /// Its `iot:ConnectAttributes` (`PersistentConnect`, `LastWill`), for the will's policy.
    pub connect_attributes: Vec<String>,
    /// Set once the connection has ended (its disconnection event published) and only its
    /// delayed will waits: when it is due, epoch milliseconds. Another node publishes only
    /// the will, then, and not before.
    pub will_due_ms: Option<u64>,
}

/// Publishes what dead nodes' connections left (the gateway's side of [`Testament`]).
pub trait Orphans: Send + Sync + std::fmt::Debug {
    /// The disconnection event of a dead node's connection.
    fn disconnected(&self, account: &str, client_id: &str, testament: &Testament);

    /// Its will, due now and not cancelled by a newer connection of the client id: authorized
    /// with its certificate's policies as they are now, then published (none for another
    /// principal).
    fn will(&self, account: &str, client_id: &str, testament: &Testament);
}
