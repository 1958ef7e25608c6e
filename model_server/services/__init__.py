"""gRPC servicers of the model server: Modelet (control) and LMService (data)."""
