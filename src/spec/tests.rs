//! Tests of the spec parser.
