//! Weighted choice among a rule's backend references (canary splits). Socket-free.

use quicmesh_shared::route::BackendRef;

/// Chooses a backend with probability weight / total; `roll` is uniform in `0..total`.
/// A weight of 0 is never chosen.
pub fn pick_backend(backends: &[BackendRef], roll: u64) -> Option<&BackendRef> {
    let mut acc = 0u64;
    for b in backends {
        acc += u64::from(b.weight);
        if roll < acc {
            return Some(b);
        }
    }
    None
}

pub fn total_weight(backends: &[BackendRef]) -> u64 {
    backends.iter().map(|b| u64::from(b.weight)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_split_exactly_and_zero_never_wins() {
        let b = |w| BackendRef { name: "s".into(), labels: Default::default(), weight: w };
        let backends = vec![b(90), b(0), b(10)];
        let total = total_weight(&backends);
        let mut counts = [0; 3];
        for roll in 0..total {
            let chosen = pick_backend(&backends, roll).unwrap();
            counts[backends.iter().position(|x| std::ptr::eq(x, chosen)).unwrap()] += 1;
        }
        assert_eq!(counts, [90, 0, 10]);
    }
}
