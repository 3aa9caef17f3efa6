"""Data the demo and tests train on, generated so nothing is downloaded."""
