"""A tiny HTTP app for the routing examples: answers every request with its own name (argv[1])
and the path, so a split, a header route or a mirror shows which version answered."""
import http.server
import os
import sys

NAME = sys.argv[1] if len(sys.argv) > 1 else "app"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"{NAME} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-app", NAME)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
