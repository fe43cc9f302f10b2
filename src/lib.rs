//! prism-sync: drains a transactional outbox into the Micro Prism bulk-update API.
pub mod sim;
