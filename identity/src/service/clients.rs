//! Per-client limits for Certify, keyed by the peer's IP address: how many calls one client
//! may have in flight at once, and how often its requests may be refused as invalid.
//!
//! Without them, one client sending junk tokens holds the service's global permits (each junk
//! token costs a TokenReview) and starves everyone else's renewals. The decisions are plain
//! functions over [`ClientTable`]; [`ClientGate`] holds the table behind a mutex that is never
//! held across an await.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Distinct client IPs tracked in each table (calls in flight, refusal budgets).
pub const MAX_TRACKED_CLIENTS: usize = 10_000;

/// The limits one client IP is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Certify calls one IP may have in flight at once (0 refuses every call).
    pub per_client: u32,
    /// Requests of one IP that may be refused as invalid per minute, which is also the burst
    /// it may cause at once; 0 turns the budget off.
    pub refusals_per_minute: u32,
    /// Distinct IPs each table tracks.
    pub max_clients: usize,
}

/// Why a call may not go ahead.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientRefusal {
    /// `limit` calls from this IP are already in flight.
    Busy { limit: u32 },
    /// This IP's tokens were refused too often lately; it may try again after `retry_after`.
    Throttled { retry_after: Duration },
    /// Calls from `max_clients` other IPs are in flight.
    Full,
}

/// A token bucket of refusals: `level` tokens at `at`, refilled at the budget's rate.
#[derive(Debug, Clone, Copy)]
struct Budget {
    level: f64,
    at: Instant,
}

/// Calls in flight and refusal budgets per client IP. An IP has an in-flight entry only while
/// it has calls in flight, and a budget entry only while its budget is not full.
#[derive(Debug)]
pub struct ClientTable {
    limits: ClientLimits,
    inflight: HashMap<IpAddr, u32>,
    budgets: HashMap<IpAddr, Budget>,
}

impl ClientTable {
    pub fn new(limits: ClientLimits) -> Self {
        ClientTable {
            limits,
            inflight: HashMap::new(),
            budgets: HashMap::new(),
        }
    }

    /// Decides whether a call from `ip` may start at `now`, and counts it in if so.
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Result<(), ClientRefusal> {
        if let Some(retry_after) = self.throttled_for(ip, now) {
            return Err(ClientRefusal::Throttled { retry_after });
        }
        let busy = self.inflight.get(&ip).copied().unwrap_or(0);
        if busy >= self.limits.per_client {
            return Err(ClientRefusal::Busy {
                limit: self.limits.per_client,
            });
        }
        if busy == 0 && self.inflight.len() >= self.limits.max_clients {
            return Err(ClientRefusal::Full);
        }
        self.inflight.insert(ip, busy + 1);
        Ok(())
    }

    /// A call admitted for `ip` has ended.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(busy) = self.inflight.get_mut(&ip) {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                self.inflight.remove(&ip);
            }
        }
    }

    /// A request from `ip` was refused as invalid (the validator refused its token, or it is
    /// malformed): it spends one from the budget.
    pub fn charge_refusal(&mut self, ip: IpAddr, now: Instant) {
        let Some(capacity) = self.capacity() else {
            return;
        };
        let level = match self.budgets.get(&ip) {
            Some(b) => self.level(b, now),
            None => {
                if self.budgets.len() >= self.limits.max_clients {
                    self.make_room(now);
                }
                capacity
            }
        };
        // It may go below zero when several calls were admitted at once: each refusal counts.
        self.budgets.insert(
            ip,
            Budget {
                level: level - 1.0,
                at: now,
            },
        );
    }

    /// Calls in flight from `ip`.
    pub fn in_flight(&self, ip: IpAddr) -> u32 {
        self.inflight.get(&ip).copied().unwrap_or(0)
    }

    /// IPs with calls in flight, and IPs whose refusal budget is not full.
    pub fn tracked(&self) -> (usize, usize) {
        (self.inflight.len(), self.budgets.len())
    }

    fn capacity(&self) -> Option<f64> {
        (self.limits.refusals_per_minute > 0).then_some(f64::from(self.limits.refusals_per_minute))
    }

    /// Refill rate, tokens per second.
    fn rate(&self) -> f64 {
        f64::from(self.limits.refusals_per_minute) / 60.0
    }

    fn level(&self, b: &Budget, now: Instant) -> f64 {
        let capacity = self.capacity().unwrap_or(0.0);
        let refilled = b.level + now.saturating_duration_since(b.at).as_secs_f64() * self.rate();
        refilled.min(capacity)
    }

    /// How long `ip` must wait for its next refusal token, if it has none; forgets a budget
    /// that has filled up again.
    fn throttled_for(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let capacity = self.capacity()?;
        let level = self.level(self.budgets.get(&ip)?, now);
        if level >= capacity {
            self.budgets.remove(&ip);
            return None;
        }
        (level < 1.0).then(|| Duration::from_secs_f64((1.0 - level) / self.rate()))
    }

    /// Drops full budgets; if none is full, the fullest one (the client closest to being
    /// forgotten anyway).
    fn make_room(&mut self, now: Instant) {
        let capacity = self.capacity().unwrap_or(0.0);
        let before = self.budgets.len();
        let levels: Vec<(IpAddr, f64)> = self
            .budgets
            .iter()
            .map(|(ip, b)| (*ip, self.level(b, now)))
            .collect();
        for (ip, level) in &levels {
            if *level >= capacity {
                self.budgets.remove(ip);
            }
        }
        if self.budgets.len() == before
            && let Some((ip, _)) = levels.iter().max_by(|a, b| a.1.total_cmp(&b.1))
        {
            self.budgets.remove(ip);
        }
    }
}

/// The table shared by all calls.
#[derive(Debug)]
pub struct ClientGate {
    table: Mutex<ClientTable>,
}

/// A call counted in for one client; dropping it counts the call out.
#[derive(Debug)]
pub struct ClientPermit {
    gate: Arc<ClientGate>,
    ip: IpAddr,
}

impl ClientGate {
    pub fn new(limits: ClientLimits) -> Arc<Self> {
        Arc::new(ClientGate {
            table: Mutex::new(ClientTable::new(limits)),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, ClientTable> {
        // The table stays consistent even if a holder panicked: every change is one insert
        // or remove.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ClientPermit, ClientRefusal> {
        self.table().admit(ip, Instant::now())?;
        Ok(ClientPermit {
            gate: self.clone(),
            ip,
        })
    }

    pub fn charge_refusal(&self, ip: IpAddr) {
        self.table().charge_refusal(ip, Instant::now());
    }

    pub fn tracked(&self) -> (usize, usize) {
        self.table().tracked()
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        self.gate.table().release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3));

    #[derive(Debug)]
    enum Step {
        /// Admit a call from the IP at `secs`; the expected answer.
        Admit(IpAddr, f64, Result<(), ClientRefusal>),
        Release(IpAddr),
        /// The validator refused a token from the IP at `secs`.
        Refused(IpAddr, f64),
        /// IPs with calls in flight, IPs with a budget that is not full.
        Tracked(usize, usize),
    }
    use Step::*;

    const OK: Result<(), ClientRefusal> = Ok(());

    fn throttled(secs: f64) -> Result<(), ClientRefusal> {
        Err(ClientRefusal::Throttled {
            retry_after: Duration::from_secs_f64(secs),
        })
    }

    fn limits(per_client: u32, refusals_per_minute: u32, max_clients: usize) -> ClientLimits {
        ClientLimits {
            per_client,
            refusals_per_minute,
            max_clients,
        }
    }

    #[test]
    fn client_table_scripts() {
        let busy2 = Err(ClientRefusal::Busy { limit: 2 });
        let cases: Vec<(&str, ClientLimits, Vec<Step>)> = vec![
            (
                "per-client limit; other clients unaffected; entries go at zero",
                limits(2, 0, 10),
                vec![
                    Admit(A, 0.0, OK),
                    Admit(A, 0.0, OK),
                    Admit(A, 0.0, busy2.clone()),
                    Admit(B, 0.0, OK),
                    Tracked(2, 0),
                    Release(A),
                    Admit(A, 0.0, OK),
                    Admit(A, 0.0, busy2.clone()),
                    Release(A),
                    Release(A),
                    Release(B),
                    Tracked(0, 0),
                    // A release without a call in flight changes nothing.
                    Release(C),
                    Tracked(0, 0),
                ],
            ),
            (
                "zero per client refuses every call",
                limits(0, 0, 10),
                vec![
                    Admit(A, 0.0, Err(ClientRefusal::Busy { limit: 0 })),
                    Tracked(0, 0),
                ],
            ),
            (
                "table of in-flight clients is bounded",
                limits(2, 0, 2),
                vec![
                    Admit(A, 0.0, OK),
                    Admit(B, 0.0, OK),
                    Admit(C, 0.0, Err(ClientRefusal::Full)),
                    // A client already in the table is not refused for the table being full.
                    Admit(A, 0.0, OK),
                    Release(B),
                    Admit(C, 0.0, OK),
                    Tracked(2, 0),
                ],
            ),
            (
                "refusal budget: burst, then one per refill interval",
                // 6 a minute: one token every 10 s.
                limits(10, 6, 10),
                vec![
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Admit(A, 0.0, OK),
                    Release(A),
                    Refused(A, 0.0),
                    Admit(A, 0.0, throttled(10.0)),
                    Admit(A, 4.0, throttled(6.0)),
                    Admit(B, 4.0, OK),
                    Release(B),
                    Admit(A, 10.0, OK),
                    Release(A),
                    Refused(A, 10.0),
                    Admit(A, 10.0, throttled(10.0)),
                    Tracked(0, 1),
                    // A full budget is forgotten.
                    Admit(A, 70.0, OK),
                    Release(A),
                    Tracked(0, 0),
                ],
            ),
            (
                "refusals of calls admitted together all count",
                limits(10, 6, 10),
                vec![
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Admit(A, 0.0, throttled(20.0)),
                ],
            ),
            (
                "budget off",
                limits(10, 0, 10),
                vec![
                    Refused(A, 0.0),
                    Refused(A, 0.0),
                    Admit(A, 0.0, OK),
                    Tracked(1, 0),
                ],
            ),
            (
                "budget table is bounded: the fullest budget goes first",
                limits(10, 6, 2),
                vec![
                    Refused(A, 0.0),
                    Refused(B, 0.0),
                    Refused(B, 0.0),
                    Refused(C, 0.0),
                    Tracked(0, 2),
                    // A (5 of 6 left) was dropped; B (4 of 6) is still remembered.
                    Refused(B, 0.0),
                    Refused(B, 0.0),
                    Refused(B, 0.0),
                    Refused(B, 0.0),
                    Admit(B, 0.0, throttled(10.0)),
                ],
            ),
            (
                "budget table is bounded: every full budget goes when room is needed",
                limits(10, 6, 2),
                vec![
                    Refused(A, 0.0),
                    Refused(B, 0.0),
                    // Both have refilled by now.
                    Refused(C, 60.0),
                    Tracked(0, 1),
                ],
            ),
        ];
        let t0 = Instant::now();
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        for (name, limits, steps) in cases {
            let mut table = ClientTable::new(limits);
            for (i, step) in steps.iter().enumerate() {
                match step {
                    Admit(ip, secs, want) => {
                        let got = table.admit(*ip, at(*secs));
                        let same = match (&got, want) {
                            (
                                Err(ClientRefusal::Throttled { retry_after: g }),
                                Err(ClientRefusal::Throttled { retry_after: w }),
                            ) => g.abs_diff(*w) < Duration::from_millis(1),
                            _ => got == *want,
                        };
                        assert!(same, "{name}, step {i} {step:?}: got {got:?}");
                    }
                    Release(ip) => table.release(*ip),
                    Refused(ip, secs) => table.charge_refusal(*ip, at(*secs)),
                    Tracked(inflight, budgets) => {
                        assert_eq!(table.tracked(), (*inflight, *budgets), "{name}, step {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn throttled_client_may_try_again_exactly_when_told() {
        let mut table = ClientTable::new(limits(4, 60, 10));
        let t0 = Instant::now();
        for _ in 0..60 {
            table.charge_refusal(A, t0);
        }
        let Err(ClientRefusal::Throttled { retry_after }) = table.admit(A, t0) else {
            panic!("not throttled after spending the whole budget");
        };
        assert_eq!(retry_after, Duration::from_secs(1));
        assert_eq!(table.admit(A, t0 + retry_after), Ok(()));
    }

    #[test]
    fn permits_count_calls_out_when_dropped() {
        let gate = ClientGate::new(limits(1, 0, 10));
        let first = gate.admit(A).unwrap();
        assert_eq!(gate.admit(A).unwrap_err(), ClientRefusal::Busy { limit: 1 });
        assert_eq!(gate.tracked(), (1, 0));
        drop(first);
        assert_eq!(gate.tracked(), (0, 0));
        let _again = gate.admit(A).unwrap();
        assert_eq!(gate.table().in_flight(A), 1);
    }
}
