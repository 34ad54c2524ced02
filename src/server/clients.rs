//! Fair admission per client address: how many conversations each one has
//! open (`server.max_sessions_per_client`) and how fast it makes new
//! requests (`server.connections_per_minute_per_client`, a token bucket
//! holding one minute's worth).
//!
//! The table is bounded: an entry with no conversation and a full bucket
//! says nothing and is dropped; when the table is full, an entry without a
//! conversation is forgotten (that address gets a fresh bucket). Entries
//! with conversations are never dropped, and there are at most
//! `server.max_sessions` of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The table never holds fewer entries than this before forgetting some.
const MIN_TRACKED: usize = 65_536;

/// How often idle entries are swept out when the table is not full.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// How often a full table may be swept: a sweep walks every entry.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Conversations open now.
    sessions: u32,
    /// Requests the address may still make at once.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

#[derive(Debug)]
struct Table {
    entries: HashMap<IpAddr, Entry>,
    swept: Instant,
}

/// Per-address admission state, shared by every connection.
#[derive(Debug)]
pub(crate) struct Clients {
    sessions_per_client: u32,
    /// Bucket size: one minute of requests.
    burst: f64,
    /// Refill, in requests per second.
    per_second: f64,
    capacity: usize,
    table: Mutex<Table>,
}

impl Clients {
    /// `max_sessions` bounds the entries that can never be forgotten.
    pub(crate) fn new(sessions_per_client: u32, per_minute: u32, max_sessions: u32) -> Self {
        let burst = f64::from(per_minute.max(1));
        Self {
            sessions_per_client,
            burst,
            per_second: burst / 60.0,
            capacity: MIN_TRACKED.max(2 * max_sessions as usize),
            table: Mutex::new(Table {
                entries: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one new request from `client`; `Err` with the wait until the
    /// next one is allowed when the address is over its rate.
    pub(crate) fn arrive(&self, client: IpAddr) -> Result<(), Duration> {
        self.arrive_at(client, Instant::now())
    }

    fn arrive_at(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut table = self.lock();
        let entry = self.entry(&mut table, client, now);
        let elapsed = now.saturating_duration_since(entry.at).as_secs_f64();
        entry.tokens = (entry.tokens + elapsed * self.per_second).min(self.burst);
        entry.at = now;
        if entry.tokens >= 1.0 {
            entry.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - entry.tokens) / self.per_second,
            ))
        }
    }

    /// A conversation slot for `client`, or `None` when the address already
    /// has `server.max_sessions_per_client`. The slot is given back when the
    /// permit is dropped.
    pub(crate) fn enter(self: &Arc<Self>, client: IpAddr) -> Option<ClientPermit> {
        let mut table = self.lock();
        let entry = self.entry(&mut table, client, Instant::now());
        if entry.sessions >= self.sessions_per_client {
            return None;
        }
        entry.sessions += 1;
        Some(ClientPermit {
            clients: Arc::clone(self),
            client,
        })
    }

    fn leave(&self, client: IpAddr) {
        if let Some(entry) = self.lock().entries.get_mut(&client) {
            entry.sessions = entry.sessions.saturating_sub(1);
        }
    }

    /// Conversations `client` has open now.
    #[cfg(test)]
    fn sessions(&self, client: IpAddr) -> u32 {
        self.lock().entries.get(&client).map_or(0, |e| e.sessions)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().entries.len()
    }

    /// The entry for `client`, made room for if the table is full.
    fn entry<'t>(&self, table: &'t mut Table, client: IpAddr, now: Instant) -> &'t mut Entry {
        let full = table.entries.len() >= self.capacity;
        let since = now.saturating_duration_since(table.swept);
        if !table.entries.contains_key(&client)
            && (since >= SWEEP_EVERY || (full && since >= FULL_SWEEP_EVERY))
        {
            let (burst, per_second) = (self.burst, self.per_second);
            table.entries.retain(|_, e| {
                let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
                e.sessions > 0 || e.tokens + elapsed * per_second < burst
            });
            table.swept = now;
        }
        if table.entries.len() >= self.capacity && !table.entries.contains_key(&client) {
            let forget = table
                .entries
                .iter()
                .find(|(_, e)| e.sessions == 0)
                .map(|(ip, _)| *ip);
            if let Some(ip) = forget {
                table.entries.remove(&ip);
            }
        }
        table.entries.entry(client).or_insert(Entry {
            sessions: 0,
            tokens: self.burst,
            at: now,
        })
    }
}

/// One conversation's place in its address's count; dropping it frees it.
#[derive(Debug)]
pub(crate) struct ClientPermit {
    clients: Arc<Clients>,
    client: IpAddr,
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        self.clients.leave(self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn each_address_has_its_own_conversation_cap() {
        let clients = Arc::new(Clients::new(2, 120, 10));
        let a1 = clients.enter(ip(1)).unwrap();
        let _a2 = clients.enter(ip(1)).unwrap();
        assert!(clients.enter(ip(1)).is_none(), "a third from one address");
        let _b = clients.enter(ip(2)).unwrap();
        assert_eq!(clients.sessions(ip(1)), 2);
        drop(a1);
        assert_eq!(clients.sessions(ip(1)), 1);
        assert!(clients.enter(ip(1)).is_some());
    }

    #[test]
    fn the_rate_is_a_minute_of_requests_refilled_evenly() {
        let clients = Clients::new(4, 60, 10);
        let t0 = Instant::now();
        for _ in 0..60 {
            clients.arrive_at(ip(1), t0).unwrap();
        }
        let wait = clients.arrive_at(ip(1), t0).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Another address is not affected.
        clients.arrive_at(ip(2), t0).unwrap();
        // One request a second comes back.
        let t1 = t0 + Duration::from_millis(1_500);
        clients.arrive_at(ip(1), t1).unwrap();
        assert!(clients.arrive_at(ip(1), t1).is_err());
        // A long pause refills the bucket, never past one minute's worth.
        let t2 = t1 + Duration::from_secs(3_600);
        for _ in 0..60 {
            clients.arrive_at(ip(1), t2).unwrap();
        }
        assert!(clients.arrive_at(ip(1), t2).is_err());
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_addresses_with_conversations() {
        let clients = Arc::new(Clients::new(4, 120, 10));
        let capacity = clients.capacity;
        let t0 = Instant::now();
        let held = clients.enter(ip(0)).unwrap();
        for n in 1..(capacity as u32 + 5_000) {
            let _ = clients.arrive_at(ip(n), t0);
        }
        assert!(clients.tracked() <= capacity, "{}", clients.tracked());
        assert_eq!(clients.sessions(ip(0)), 1, "never forgotten");
        // A minute later the idle entries (full buckets) are swept out.
        let later = t0 + Duration::from_secs(61);
        clients.arrive_at(ip(u32::MAX >> 4), later).unwrap();
        assert_eq!(clients.tracked(), 2, "the held address and the new one");
        drop(held);
        assert_eq!(clients.sessions(ip(0)), 0);
    }
}
