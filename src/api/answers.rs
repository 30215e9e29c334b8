//! Customer answers built once, shared, and held within a byte budget (issue 13).
//!
//! An answer is built whole in memory, because its `ETag` is a hash of it (SPEC 1.3). The
//! 30k-call account of a busy node answers ~21 MB, and a slow client holds its answer for
//! as long as it takes to read it: built per request, 50 such clients held 1.8 GB. So:
//!
//! - **One answer per state.** Requests that ask the same (customer, account, filters) of
//!   the same state of the store share one answer: the first builds it, the others wait
//!   for it, and every response sends the same bytes. The state is the current nodes with
//!   the generation in which what their calls show last changed (what the scrape's `ETag`
//!   is made of): the answer cannot differ while it stays. An answer lives as long as a
//!   response still sends it.
//! - **A budget.** Beyond [`FREE_BYTES`], the bytes of every answer being built or sent
//!   come out of one budget ([`BUDGET_BYTES`]); a build that would pass it stops at once
//!   and is answered 503 with `Retry-After`. Small answers never touch it, so they cost
//!   what they did (one more small query, for the state). Memory for answers is then at
//!   most the budget plus `api.max_connections` small ones, whatever the clients do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use hyper::body::Bytes;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::store::{CallQuery, Readers};

/// Answers up to this size are free of the budget.
pub const FREE_BYTES: usize = 64 * 1024;
/// What all larger answers in flight may hold together.
pub const BUDGET_BYTES: usize = 48 << 20;
/// The budget's unit: a permit per this many bytes.
pub const UNIT: usize = 64 * 1024;

/// The answers in flight, by what they answer.
pub struct Answers {
    budget: Arc<Semaphore>,
    /// What of the budget scrapes may hold together (half): a few aggregators that read
    /// slowly must not turn every large customer answer away.
    scrape_share: Arc<Semaphore>,
    /// The budget's size in units: an answer larger than the whole budget takes all of
    /// it (it is then sent alone) rather than never.
    units: usize,
    shared: Mutex<HashMap<String, Weak<Slot>>>,
}

/// One answer: built once by whoever asked first.
struct Slot {
    built: OnceCell<Result<Built, Failed>>,
}

struct Built {
    body: Vec<u8>,
    etag: String,
    /// Its share of the budget, given back when the last response sending it is done.
    _held: Option<OwnedSemaphorePermit>,
}

/// A stream event's share of the budget (and of the scrapes' share, for a node's stream),
/// given back when dropped.
pub struct Held {
    _budget: OwnedSemaphorePermit,
    _share: Option<OwnedSemaphorePermit>,
}

/// Why an answer could not be built.
#[derive(Debug, Clone)]
pub enum Failed {
    /// It would pass the budget: answered 503 with `Retry-After`.
    Busy,
    /// The store failed (logged by the caller; a 500).
    Store(String),
}

/// A built answer, for one response.
pub struct Answer {
    slot: Arc<Slot>,
}

impl Answer {
    pub fn etag(&self) -> &str {
        self.built().map_or("", |b| b.etag.as_str())
    }

    /// The body, sharing the bytes (and keeping the answer alive until it is sent).
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }

    fn built(&self) -> Option<&Built> {
        self.slot.built.get()?.as_ref().ok()
    }
}

impl AsRef<[u8]> for Answer {
    fn as_ref(&self) -> &[u8] {
        self.built().map_or(&[], |b| b.body.as_slice())
    }
}

impl Answers {
    /// Answers within `budget_bytes` (`api.max_answer_bytes`).
    pub fn new(budget_bytes: usize) -> Answers {
        let units = (budget_bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Answers {
            budget: Arc::new(Semaphore::new(units)),
            scrape_share: Arc::new(Semaphore::new((units / 2).max(1))),
            units,
            shared: Mutex::new(HashMap::new()),
        }
    }

    /// What a scrape whose client does not keep up may hold, in units of [`UNIT`] bytes:
    /// the budget, of which at most its scrapes' share; and the budget's size.
    pub fn scrape_budget(&self) -> (Arc<Semaphore>, Arc<Semaphore>, usize) {
        (self.budget.clone(), self.scrape_share.clone(), self.units)
    }

    /// The share of the budget a stream's event of `bytes` holds until it is written
    /// (`None`: it is small enough to be free of it), or [`Failed::Busy`] when the
    /// budget has no room for it now. An event larger than the whole budget takes all.
    /// A node's stream (an aggregator's) takes from the scrapes' share too, as a scrape
    /// does: aggregators never hold more than half of it.
    pub fn hold(&self, bytes: usize, node: bool) -> Result<Option<Held>, Failed> {
        let need = bytes
            .saturating_sub(FREE_BYTES)
            .div_ceil(UNIT)
            .min(self.units);
        if need == 0 {
            return Ok(None);
        }
        let take = |from: &Arc<Semaphore>, most: usize| {
            let units = u32::try_from(need.min(most)).unwrap_or(u32::MAX);
            from.clone()
                .try_acquire_many_owned(units)
                .map_err(|_| Failed::Busy)
        };
        let share = if node {
            Some(take(&self.scrape_share, (self.units / 2).max(1))?)
        } else {
            None
        };
        Ok(Some(Held {
            _budget: take(&self.budget, self.units)?,
            _share: share,
        }))
    }

    /// The answer to `query`, shared with every request for the same thing of the same
    /// state of the store; built here (with `etag_of`) if none is in flight.
    pub async fn get(
        &self,
        readers: &Readers,
        query: &CallQuery,
        etag_of: fn(&[u8]) -> String,
    ) -> Result<Answer, Failed> {
        let state = tokio::task::block_in_place(|| readers.node_generations(query.now_ms))
            .map_err(|e| Failed::Store(e.to_string()))?;
        let key = format!(
            "{} {} {:?} {:?}",
            query.customer_id, query.account_id, query.filters, state
        );
        let slot = {
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            match shared.get(&key).and_then(Weak::upgrade) {
                Some(slot) => slot,
                None => {
                    if shared.len() >= 256 {
                        shared.retain(|_, slot| slot.strong_count() > 0);
                    }
                    let slot = Arc::new(Slot {
                        built: OnceCell::new(),
                    });
                    shared.insert(key, Arc::downgrade(&slot));
                    slot
                }
            }
        };
        let built = slot
            .built
            .get_or_init(|| async { self.build(readers, query, etag_of) })
            .await;
        match built {
            Ok(_) => Ok(Answer { slot }),
            Err(e) => Err(e.clone()),
        }
    }

    /// Builds an answer, taking from the budget as it grows past [`FREE_BYTES`].
    fn build(
        &self,
        readers: &Readers,
        query: &CallQuery,
        etag_of: fn(&[u8]) -> String,
    ) -> Result<Built, Failed> {
        let mut held: Option<OwnedSemaphorePermit> = None;
        let mut body = Vec::with_capacity(4096);
        // Most answers take a few tens of microseconds: handing them to another thread
        // would cost more than the query. block_in_place lets the runtime move this
        // worker's other tasks away, so a long scan of a big account never stalls it.
        let answered = tokio::task::block_in_place(|| {
            readers.outgoing_calls_within(query, &mut body, |capacity| {
                let need = capacity
                    .saturating_sub(FREE_BYTES)
                    .div_ceil(UNIT)
                    .min(self.units);
                let units = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
                if need <= units {
                    return true;
                }
                let more = u32::try_from(need - units).unwrap_or(u32::MAX);
                match self.budget.clone().try_acquire_many_owned(more) {
                    Ok(more) => {
                        match &mut held {
                            Some(permit) => permit.merge(more),
                            None => held = Some(more),
                        }
                        true
                    }
                    Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => false,
                }
            })
        });
        match answered {
            Ok(Some(_)) => {}
            Ok(None) => return Err(Failed::Busy),
            Err(e) => return Err(Failed::Store(e.to_string())),
        }
        let etag = etag_of(&body);
        Ok(Built {
            body,
            etag,
            _held: held,
        })
    }
}
