"""Durable batch jobs in the OpenAI Files + Batches shape: a database store, the worker that
runs batch lines through the classifier at low priority, and the `linmod-batch` client.
"""
