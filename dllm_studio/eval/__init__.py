"""Evaluation: task suites (`suites`), pure answer scorers and the code sandbox (`scoring`), and the
runner that generates and scores answers as an event-stream job (`runner`)."""
