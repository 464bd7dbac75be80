"""Embedded infrastructure for one machine and for the tests: the Tansu broker and throwaway PostgreSQL servers."""
