//! Thinning history to retention tiers (docs/retention-tiers.md): which points each tier
//! keeps ([`kept`]), and which journal records those points still need ([`survivors`]).

pub mod kept;
pub mod survivors;
