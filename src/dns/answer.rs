//! Answer building: a pure function of (query bytes, table, rotation).
