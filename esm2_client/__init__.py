"""Python client and `esm2` command line for the ESM-2 inference service."""

from esm2_client.client import AsyncEsm2Client, Esm2Client, Esm2Error, RetryPolicy
from esm2_client.streams import ItemOutputs

__all__ = ["AsyncEsm2Client", "Esm2Client", "Esm2Error", "ItemOutputs", "RetryPolicy"]
