//! Thinning history to retention tiers (docs/retention-tiers.md): which points each tier
//! keeps ([`kept`]), which journal records those points still need ([`survivors`]), and the
//! table of a thinned segment ([`table`]).

pub mod kept;
pub mod records;
pub mod segment;
pub mod summary;
pub mod survivors;
pub mod table;
