"""router: the public entry point; places each request on the executor that can serve it soonest."""
