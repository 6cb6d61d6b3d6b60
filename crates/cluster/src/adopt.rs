//! When a node dies (decision 0012): every node says it is alive on `{name}.hb` every half
//! second; a node that has not been heard for [`DEAD_AFTER`] (while the listener itself was
//! connected) is dead. The others then adopt its connections, as its claims name them: each
//! claim that still carries a testament is replaced by one that carries none, written only
//! if it still follows the dead node's (`Nats-Expected-Last-Subject-Sequence`), so exactly one
//! node adopts each connection, and none adopts one whose device connected again meanwhile.
//! The adopter publishes the connection's disconnection event and its will (after its delay,
//! unless the client id was claimed again by then).
//!
//! The adopting claim keeps the dead node's name: that node's storage still holds the
//! client id's persistent session, which moves from it when the device resumes after the node
//! restarted. A node that was only cut off sees the adopting claims when it is back and ends
//! those connections without a second event or will ([`sekisho_broker::Kick::Adopted`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use sekisho_broker::peers::Testament;

use crate::testament::{self, HEARTBEAT, Liveness, Verdict};
use crate::{Owners, claim_ttl, subject};

/// How often liveness is looked at.
const CHECK: Duration = Duration::from_millis(250);

/// How many adoptions are on their way at once during a sweep.
const AT_ONCE: usize = 64;

/// How long a sweep waits for the next claim before it gives up (and tries again later).
const SWEEP_WAIT: Duration = Duration::from_secs(5);

/// How often the claims are swept even when no node died (claims whose adoption or
/// retirement did not get through).
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// A liveness check this much later than due means this node stalled: it listens again from
/// then on before it declares anyone dead.
const STALLED: Duration = Duration::from_secs(1);

/// What a node says when it stops normally (its connections ended, their claims stored): the
/// others never take it for dead.
pub(crate) fn leaving(run: u64, node: &str) -> Bytes {
    let mut b = testament::encode(run, node, None);
    b.extend_from_slice(b"\nbye");
    Bytes::from(b)
}

/// Says this node is alive, every [`HEARTBEAT`], for as long as the process runs.
pub(crate) async fn heartbeat(client: async_nats::Client, subject: String, run: u64, node: String) {
    let payload = Bytes::from(testament::encode(run, &node, None));
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = client.publish(subject.clone(), payload.clone()).await;
    }
}

/// Hears the other nodes' heartbeats and adopts the connections of those that die. A sweep
/// of the claims also runs once this node has listened long enough to be sure (it adopts the
/// connections of nodes that died before it started, and retires its own stale testaments),
/// after a sweep that did not finish, and every [`SWEEP_EVERY`].
pub(crate) async fn watch(
    client: async_nats::Client,
    up: Arc<AtomicBool>,
    owners: Arc<Owners>,
    subject: String,
) {
    let mut beats = match client.subscribe(subject).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cluster: heartbeats not followed; dead nodes' connections are not adopted here");
            return;
        }
    };
    let mut live = Liveness::default();
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept: Option<Instant> = None;
    let mut checked = Instant::now();
    loop {
        tokio::select! {
            // Heartbeats already here count before a check does.
            biased;
            m = beats.next() => match m {
                Some(m) => match testament::head(&m.payload) {
                    Some((run, _, true)) => live.left(run),
                    Some((run, _, false)) => live.heard(run, Instant::now()),
                    None => {}
                },
                None => return,
            },
            _ = tick.tick() => {
                let now = Instant::now();
                // A check much later than due (this node stalled, or a sweep ran): what it
                // did not hear meanwhile says nothing about the others.
                if now.saturating_duration_since(checked) > STALLED {
                    live.listening(false, now);
                }
                checked = now;
                live.listening(
                    up.load(Ordering::Relaxed)
                        && client.connection_state() == async_nats::connection::State::Connected,
                    now,
                );
                // Listening again after a break: this node's own claims are looked at again
                // (connections that ended while it was cut off left their testaments).
                if !live.sure(now) {
                    swept = None;
                }
                let dead = live.newly_dead(now);
                for run in &dead {
                    tracing::warn!(run = format!("{run:016x}"), "cluster: a node stopped answering; adopting its connections");
                }
                let due = swept.is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY);
                // A node whose registry does not follow the log would authorize wills with
                // what may be revoked: it leaves adoption to the others.
                let Some(verdict) = live.verdict(now) else { continue };
                if (!dead.is_empty() || due)
                    && owners.orphans.get().is_some()
                    && owners.registry_alive.load(Ordering::Relaxed)
                {
                    match sweep(&client, &owners, &verdict).await {
                        Ok((n, 0)) => {
                            swept = Some(Instant::now());
                            if n > 0 {
                                tracing::info!(adopted = n, "cluster: adopted dead nodes' connections");
                            }
                        }
                        Ok((n, failed)) => {
                            swept = None;
                            tracing::warn!(adopted = n, failed, "cluster: some dead nodes' connections could not be adopted; trying again");
                        }
                        Err(e) => {
                            swept = None;
                            tracing::warn!(error = %e, "cluster: reading the claims for dead nodes' connections; trying again");
                        }
                    }
                }
            }
        }
    }
}

/// Reads the last claim of every client id and adopts those of runs dead in `verdict` that
/// still carry a testament. This node's own claims whose connections ended while it could
/// not say so (cut off from NATS) lose their testaments. Returns how many this node adopted
/// and how many adoptions failed (to be tried again).
async fn sweep(
    client: &async_nats::Client,
    owners: &Arc<Owners>,
    verdict: &Verdict,
) -> Result<(usize, usize), String> {
    let began = SystemTime::now();
    let mut stream = owners.stream.clone();
    let info = stream.info().await.map_err(|e| e.to_string())?;
    if info.state.messages == 0 {
        return Ok((0, 0));
    }
    let mut claims = stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{}.c.>", owners.prefix),
            deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    let mut work = FuturesUnordered::new();
    let (mut adopted, mut failed, mut read) = (0, 0, 0usize);
    let mut count = |r: Adoption| match r {
        Adoption::Done => adopted += 1,
        Adoption::Failed => failed += 1,
        Adoption::Moot => {}
    };
    let began_ns = began
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    loop {
        let m = match tokio::time::timeout(SWEEP_WAIT, claims.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("the claims ended".into()),
            // Nothing under the filter.
            Err(_) if read == 0 => break,
            Err(_) => return Err("no claim came for 5 s".into()),
        };
        read += 1;
        let Ok(info) = m.info() else { continue };
        let (seq, pending) = (info.stream_sequence, info.pending);
        // How long before the sweep began the claim was stored (by NATS's clock; a node whose
        // clock is behind sees claims younger than they are, and adopts them at a later sweep).
        let age = Duration::from_nanos(
            began_ns
                .saturating_sub(info.published.unix_timestamp_nanos())
                .clamp(0, i128::from(u64::MAX)) as u64,
        );
        if let Some(body) = testament::decode(&m.payload)
            && let Some((t, keep)) = body.testament
        {
            if body.run == owners.node_id {
                // Nothing here holds or claims the client id any more (a delayed will that
                // waits here keeps its testament until it is published or cancelled, or is
                // a minute overdue).
                let waits = t
                    .will_due_ms
                    .is_some_and(|due| due.saturating_add(60_000) > crate::now_ms());
                if let Some(key) = subject::parse_claim(&owners.prefix, m.subject.as_str())
                    && !waits
                    && !owners.lock().contains_key(&key)
                {
                    tokio::spawn(retire(
                        owners.js.clone(),
                        m.subject.to_string(),
                        seq,
                        Bytes::from(testament::encode(owners.node_id, &owners.node, None)),
                        keep,
                    ));
                }
            } else if verdict.orphaned(body.run, age) {
                work.push(adopt(
                    owners.clone(),
                    m.subject.to_string(),
                    seq,
                    body.node,
                    t,
                    keep,
                ));
                while work.len() >= AT_ONCE {
                    if let Some(r) = work.next().await {
                        count(r);
                    }
                }
            }
        }
        if pending == 0 {
            break;
        }
    }
    while let Some(r) = work.next().await {
        count(r);
    }
    Ok((adopted, failed))
}

/// Takes the testament off this node's claim `seq` (its connection ended while the node could
/// not say so, or the claim was refused after it was stored), if no later claim came
/// meanwhile: `payload` is the claim without it.
pub(crate) async fn retire(
    js: jetstream::Context,
    subject: String,
    seq: u64,
    payload: Bytes,
    keep: Duration,
) {
    let _ = retire_now(&js, &subject, seq, payload, keep).await;
}

/// [`retire`], saying how it went: `Err(true)` when a later claim came (the claim was not
/// replaced), `Err(false)` when JetStream did not answer.
pub(crate) async fn retire_now(
    js: &jetstream::Context,
    subject: &str,
    seq: u64,
    payload: Bytes,
    keep: Duration,
) -> Result<(), bool> {
    let mut h = HeaderMap::new();
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        seq.to_string().as_str(),
    );
    h.insert("Nats-TTL", claim_ttl(keep).as_str());
    let r = match js
        .publish_with_headers(subject.to_owned(), h, payload)
        .await
    {
        Ok(ack) => ack.await.map(|_| ()),
        Err(e) => Err(e),
    };
    r.map_err(|e| e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence)
}

/// What adopting one connection came to.
enum Adoption {
    /// This node adopted it and published what it left.
    Done,
    /// Another node adopted it first, or the device connected again.
    Moot,
    /// Not known (no answer from JetStream): tried again at the next sweep.
    Failed,
}

/// Adopts one connection of a dead node: replaces its claim `seq` (if it is still the last)
/// by one that carries no testament, in the dead node's name, then publishes its event and
/// its will.
async fn adopt(
    owners: Arc<Owners>,
    subject: String,
    seq: u64,
    node: String,
    t: Testament,
    keep: Duration,
) -> Adoption {
    let Some((account, client_id)) = subject::parse_claim(&owners.prefix, &subject) else {
        return Adoption::Moot;
    };
    let Some(orphans) = owners.orphans.get().cloned() else {
        return Adoption::Failed;
    };
    let mut h = HeaderMap::new();
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        seq.to_string().as_str(),
    );
    h.insert("Nats-TTL", claim_ttl(keep).as_str());
    let payload = Bytes::from(testament::encode(owners.node_id, &node, None));
    let stored = match owners
        .js
        .publish_with_headers(subject.clone(), h, payload)
        .await
    {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    let fence = match stored {
        Ok(ack) => ack.sequence,
        Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
            return Adoption::Moot;
        }
        // No answer: stored or not? The claim says.
        Err(_) => match owners
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) if m.sequence == seq => return Adoption::Failed,
            Ok(m)
                if testament::head(&m.payload)
                    .is_some_and(|(run, _, carries)| run == owners.node_id && !carries) =>
            {
                m.sequence
            }
            Ok(_) => return Adoption::Moot,
            Err(_) => return Adoption::Failed,
        },
    };
    tracing::info!(%client_id, from = %node, "cluster: a dead node's connection adopted");
    // A connection that had ended published its event then: only its delayed will waits.
    if t.will_due_ms.is_none() {
        orphans.disconnected(&account, &client_id, &t);
    }
    let Some((delay, _)) = &t.will else {
        return Adoption::Done;
    };
    let delay = match t.will_due_ms {
        Some(due) => Duration::from_millis(due.saturating_sub(crate::now_ms())),
        None => *delay,
    };
    if t.certificate.is_none() {
        tracing::info!(%client_id, "cluster: a dead node's will of a principal other than a certificate is not published");
        return Adoption::Done;
    }
    if delay.is_zero() {
        orphans.will(&account, &client_id, &t);
        return Adoption::Done;
    }
    // A delayed will: sent when due, unless the client id was claimed again meanwhile (on
    // any node: its claim follows this one).
    let stream = owners.stream.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        for _ in 0..5 {
            match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) if m.sequence == fence => {
                    orphans.will(&account, &client_id, &t);
                    return;
                }
                Ok(_) => {
                    tracing::debug!(%client_id, "cluster: a dead node's delayed will cancelled by a new connection");
                    return;
                }
                Err(e) => {
                    tracing::warn!(%client_id, error = %e, "cluster: a dead node's delayed will: reading its claim; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Adoption::Done
}
