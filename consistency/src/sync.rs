//! Locking that survives a panicking holder.
//!
//! A mutex is poisoned when a thread panics while holding it. Every lock in Hindsight guards
//! state that stays valid between two statements (a table of writes in flight, a queue, a
//! counter), and a panic already stops the thread that caused it; refusing the lock everywhere
//! else would turn one failed thread into a stopped process. So the data is taken as it is.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data even if a panicking thread poisoned the mutex.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_takes_the_data_of_a_poisoned_mutex() {
        let m = std::sync::Arc::new(Mutex::new(7));
        let m2 = std::sync::Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 7);
    }
}
