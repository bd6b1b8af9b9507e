//! The consistent-hash ring that names the owner of each routing key.
//!
//! Every live member is placed on a 64-bit circle at `vnodes` points (xxh3 of the xxh3 of its
//! name and the point's index); a key belongs to the first point at or after the key's own xxh3 hash,
//! wrapping at the top. Lookup is a binary search over the sorted points, O(log n). Because a
//! member's points depend only on its name, every node that sees the same members builds the
//! same ring, with no coordination, and adding or removing one of n members moves only the keys
//! on that member's arcs: about 1/n of them.

use xxhash_rust::xxh3::xxh3_64;

/// Points each member takes on the ring when `cluster.vnodes` is not set.
pub const DEFAULT_VNODES: usize = 128;

/// An immutable ring over a set of member names; rebuilt whenever membership changes.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// (position, index into `members`), sorted by position then index.
    points: Vec<(u64, u32)>,
    /// Member names, sorted, without duplicates.
    members: Vec<String>,
}

impl Ring {
    /// Builds the ring for `members` with `vnodes` points each (at least one).
    pub fn new<I, S>(members: I, vnodes: usize) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut members: Vec<String> = members.into_iter().map(Into::into).collect();
        members.sort_unstable();
        members.dedup();

        let vnodes = vnodes.max(1);
        let mut points = Vec::with_capacity(members.len() * vnodes);
        for (index, name) in members.iter().enumerate() {
            let index = u32::try_from(index).expect("fewer than 2^32 members");
            for point in 0..vnodes {
                points.push((position(name, point), index));
            }
        }
        // Ties between two members' points are vanishingly rare, but breaking them by index
        // keeps every node's ring identical even then.
        points.sort_unstable();

        Self { points, members }
    }

    /// The member that owns `key`, or none when the ring is empty.
    pub fn owner(&self, key: &[u8]) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        let hash = xxh3_64(key);
        let at = self
            .points
            .partition_point(|&(position, _)| position < hash);
        let (_, index) = self.points[at % self.points.len()];
        Some(&self.members[index as usize])
    }

    /// The member names on the ring, sorted.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// Where point `point` of member `name` sits. The name's hash and the index are hashed together
/// as 16 bytes: seeding xxh3 with the index instead mixes poorly for names of 1 to 3 bytes, so
/// names such as `n01` and `n02` got nearly the same points and one of them nearly every key.
fn position(name: &str, point: usize) -> u64 {
    let mut input = [0u8; 16];
    input[..8].copy_from_slice(&xxh3_64(name.as_bytes()).to_le_bytes());
    input[8..].copy_from_slice(&(point as u64).to_le_bytes());
    xxh3_64(&input)
}

#[cfg(test)]
mod tests;
