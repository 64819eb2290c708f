//! Wake-ups between tasks of one core: no locks, no atomics, since both sides live on the
//! same executor.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Wakes one waiting task. A notification sent while nobody waits is kept, so a wake-up is
/// never lost between a check and the wait.
#[derive(Default)]
pub struct Notify {
    pending: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.pending.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    pub async fn notified(&self) {
        poll_fn(|cx| {
            if self.pending.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// Wakes every waiting task. Waiters re-check their condition after waking.
#[derive(Default)]
pub struct Event {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Event {
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        for waker in self.wakers.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Resolves at the next `notify_all` after this call.
    pub async fn wait(&self) {
        let start = self.generation.get();
        // The waker this wait registered: a task polled again for another reason (a
        // connection's task is woken by its writer too) does not add it again.
        let mut registered: Option<Waker> = None;
        poll_fn(|cx| {
            if self.generation.get() != start {
                return Poll::Ready(());
            }
            if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                self.wakers.borrow_mut().push(cx.waker().clone());
                registered = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}
