"""Test utilities: tiny offline models (built from configs, nothing downloaded) and their inputs."""
