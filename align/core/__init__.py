"""Shared core: config loading, ChatML and masks, record schemas, engines and run state. Imports only base_model."""
